//! Container logs in the CRI format the runtime writes at the container's
//! `log_path`: one line per chunk, `TIMESTAMP STREAM TAG MESSAGE`, e.g.
//! `2016-10-06T00:17:09.669794202Z stdout F hello`. The tag is `F` for a full line
//! or `P` for a partial one (a long line split, or output without a newline yet),
//! optionally followed by `:`-separated extensions.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub timestamp: &'a str,
    pub stream: Stream,
    /// `P`: the message continues in the next line of the same stream.
    pub partial: bool,
    pub message: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("log line {line}: {reason}: {text:?}")]
pub struct LogError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

/// Parses one log line (without its newline); `line` numbers it for the error.
pub fn parse_line(text: &str, line: usize) -> Result<LogLine<'_>, LogError> {
    let err = |reason| LogError { line, reason, text: text.chars().take(120).collect() };
    let mut parts = text.splitn(4, ' ');
    let timestamp = parts.next().filter(|t| !t.is_empty()).ok_or_else(|| err("no timestamp"))?;
    let stream = match parts.next() {
        Some("stdout") => Stream::Stdout,
        Some("stderr") => Stream::Stderr,
        _ => return Err(err("the stream is not stdout or stderr")),
    };
    let partial = match parts.next().map(|t| t.split(':').next().unwrap_or_default()) {
        Some("P") => true,
        Some("F") => false,
        _ => return Err(err("the tag is not P or F")),
    };
    // An empty line is written as "TS stdout F " or, by some writers, without the space.
    let message = parts.next().unwrap_or_default();
    Ok(LogLine { timestamp, stream, partial, message })
}

/// What `crictl logs` prints: each stream's messages with partial lines joined,
/// as (stream, text) chunks in file order.
pub fn render(log: &str) -> Result<Vec<(Stream, String)>, LogError> {
    let mut out = Vec::new();
    for (i, text) in log.lines().enumerate() {
        let l = parse_line(text, i + 1)?;
        let mut chunk = l.message.to_string();
        if !l.partial {
            chunk.push('\n');
        }
        out.push((l.stream, chunk));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_containerd_parse() {
        let l = parse_line("2024-05-01T10:00:00.123456789Z stdout F started-1", 1).unwrap();
        assert_eq!(
            l,
            LogLine { timestamp: "2024-05-01T10:00:00.123456789Z", stream: Stream::Stdout, partial: false, message: "started-1" }
        );
        let l = parse_line("2024-05-01T10:00:00Z stderr P part of a line with  two spaces", 2).unwrap();
        assert_eq!((l.stream, l.partial, l.message), (Stream::Stderr, true, "part of a line with  two spaces"));
        assert_eq!(parse_line("2024-05-01T10:00:00Z stdout F ", 3).unwrap().message, "");
        assert_eq!(parse_line("2024-05-01T10:00:00Z stdout F", 3).unwrap().message, "");
        assert!(!parse_line("2024-05-01T10:00:00Z stdout F:x msg", 4).unwrap().partial, "tag extensions are skipped");
    }

    #[test]
    fn bad_lines_are_named() {
        let e = parse_line("2024-05-01T10:00:00Z stdin F x", 7).unwrap_err();
        assert_eq!(e.line, 7);
        assert!(e.to_string().contains("stdout or stderr"), "{e}");
        assert!(parse_line("2024-05-01T10:00:00Z stdout X x", 1).unwrap_err().to_string().contains("P or F"));
        assert!(parse_line("", 1).is_err());
        assert!(parse_line("just text", 1).is_err());
    }

    #[test]
    fn partial_lines_are_joined_when_rendered() {
        let log = "T1 stdout P hel\nT2 stdout F lo\nT3 stderr F oops\nT4 stdout F \n";
        let chunks = render(log).unwrap();
        let stdout: String = chunks.iter().filter(|(s, _)| *s == Stream::Stdout).map(|(_, t)| t.as_str()).collect();
        let stderr: String = chunks.iter().filter(|(s, _)| *s == Stream::Stderr).map(|(_, t)| t.as_str()).collect();
        assert_eq!(stdout, "hello\n\n");
        assert_eq!(stderr, "oops\n");
    }
}

//! crictl's errors as it prints them. crictl (Go) ends every failed command with
//! `logrus.Fatal(err)`: one line on stderr from logrus's text formatter (stderr is
//! not a terminal when a test or script reads it), then exit status 1:
//!
//! ```text
//! time="2026-01-05T10:00:00Z" level=fatal msg="run pod sandbox: rpc error: code = Unknown desc = bad \"64\""
//! ```
//!
//! The message is quoted the way Go's `%q` quotes (`strconv.Quote`) as soon as it
//! holds anything but `[A-Za-z0-9-._/@^+]`: inner `"` and `\` are escaped, a newline
//! is `\n`, and so on. [`fatal_line`] writes such a line; [`fatal_message`] reads
//! the message back out of a client's stderr, whichever of crictl and vfvm-crictl
//! wrote it, so a check on an error's text need not care about the escaping.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Go's `strconv.Quote` of a byte string (what `fmt.Sprintf("%q", s)` writes):
/// `"` and `\` escaped, printable characters as they are, the usual C escapes for
/// control characters, `\xHH` for other ASCII controls and for bytes that are not
/// UTF-8, `\uHHHH`/`\UHHHHHHHH` for other characters Go does not print.
///
/// Go decides "printable" with Unicode's categories (`unicode.IsPrint`); Rust's
/// standard library has no such table, so [`go_prints`] approximates it: it agrees
/// for ASCII, control characters, spaces and separators, the common format
/// characters and private use; a code point Unicode has not assigned is printed
/// here where Go would escape it.
pub fn go_quote(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for chunk in text.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{7}' => out.push_str("\\a"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{b}' => out.push_str("\\v"),
                c if go_prints(c) => out.push(c),
                c if c < ' ' || c == '\u{7f}' => {
                    let _ = write!(out, "\\x{:02x}", u32::from(c));
                }
                c if u32::from(c) < 0x10000 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => {
                    let _ = write!(out, "\\U{:08x}", u32::from(c));
                }
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    out
}

/// Whether Go's `unicode.IsPrint` holds for `c`, as far as it can be told without
/// Unicode's category tables (see [`go_quote`]).
pub fn go_prints(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(u32::from(c),
        // Format characters (Cf).
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f | 0x202a..=0x202e
        | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff | 0xfff9..=0xfffb
        // Private use (Co) and the noncharacters U+FFFE, U+FFFF.
        | 0xe000..=0xf8ff | 0xfffe | 0xffff | 0xf0000..=0x10ffff)
}

/// Reads one Go-quoted string (as [`go_quote`] and Go's `strconv.Quote` write it)
/// from the start of `text`: its bytes, and how many bytes of `text` it took,
/// quotes included. `None` if `text` does not start with a well-formed one.
pub fn go_unquote(text: &str) -> Option<(Vec<u8>, usize)> {
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let hex = |digits: &[u8]| -> Option<u32> {
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some((out, i + 1)),
            b'\\' => {
                let esc = *bytes.get(i + 1)?;
                i += 2;
                let simple = match esc {
                    b'a' => Some(7),
                    b'b' => Some(8),
                    b'f' => Some(0xc),
                    b'n' => Some(b'\n'),
                    b'r' => Some(b'\r'),
                    b't' => Some(b'\t'),
                    b'v' => Some(0xb),
                    b'\\' | b'"' | b'\'' => Some(esc),
                    _ => None,
                };
                if let Some(b) = simple {
                    out.push(b);
                    continue;
                }
                match esc {
                    b'x' => {
                        let v = hex(bytes.get(i..i + 2)?)?;
                        out.push(u8::try_from(v).ok()?);
                        i += 2;
                    }
                    b'u' | b'U' => {
                        let n = if esc == b'u' { 4 } else { 8 };
                        let c = char::from_u32(hex(bytes.get(i..i + n)?)?)?;
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                        i += n;
                    }
                    b'0'..=b'7' => {
                        let digits = bytes.get(i - 1..i + 2)?;
                        let mut v = 0u32;
                        for d in digits {
                            if !(b'0'..=b'7').contains(d) {
                                return None;
                            }
                            v = v * 8 + u32::from(d - b'0');
                        }
                        out.push(u8::try_from(v).ok()?);
                        i += 2;
                    }
                    _ => return None,
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

/// A value as logrus's text formatter writes it: bare when it holds only
/// `[A-Za-z0-9-._/@^+]` (an empty one too), else Go-quoted.
pub fn logfmt_value(text: &[u8]) -> String {
    let bare = text.iter().all(|b| b.is_ascii_alphanumeric() || b"-._/@^+".contains(b));
    if bare {
        String::from_utf8_lossy(text).into_owned()
    } else {
        go_quote(text)
    }
}

/// `time`, as logrus's default timestamp (Go's RFC 3339, whole seconds), in UTC:
/// `2026-01-05T10:00:00Z` (crictl writes the local zone; the lab's is UTC).
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days to a civil date (Howard Hinnant's algorithm), for dates from 1970 on.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// A line of logrus's text formatter (without its newline): `time`, `level`
/// (`fatal`, `error`, `warning`, `info`, `debug`) and `msg`.
pub fn log_line(time: SystemTime, level: &str, message: &[u8]) -> String {
    format!("time={} level={} msg={}", logfmt_value(rfc3339_utc(time).as_bytes()), logfmt_value(level.as_bytes()), logfmt_value(message))
}

/// The line crictl's `logrus.Fatal(err)` writes (without its newline), for an
/// error whose text is `message`.
pub fn fatal_line(time: SystemTime, message: &[u8]) -> String {
    log_line(time, "fatal", message)
}

/// The value of `key=` in one logrus text line, unquoted.
fn field(line: &str, key: &str) -> Option<String> {
    let start = if line.starts_with(&format!("{key}=")) { key.len() + 1 } else { line.find(&format!(" {key}="))? + key.len() + 2 };
    let rest = &line[start..];
    if rest.starts_with('"') {
        let (bytes, _) = go_unquote(rest)?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        Some(rest.split(' ').next().unwrap_or_default().to_string())
    }
}

/// The error a crictl-style client failed with, from its stderr: the message of
/// its last `level=fatal` line (else of its last `level=error` line), unquoted,
/// e.g. `run pod sandbox: rpc error: code = Unknown desc = bad "64"`. `None` if
/// stderr holds no such line.
pub fn fatal_message(stderr: &str) -> Option<String> {
    let logrus_lines = || stderr.lines().rev().filter(|l| l.starts_with("time=") || l.starts_with("level="));
    ["fatal", "error"]
        .iter()
        .find_map(|level| logrus_lines().filter(|l| field(l, "level").as_deref() == Some(level)).find_map(|l| field(l, "msg")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn quoting_is_gos() {
        // Outputs of Go's strconv.Quote for the same inputs.
        assert_eq!(go_quote(b"plain"), r#""plain""#);
        assert_eq!(go_quote(br#"bad "64" \ ok"#), r#""bad \"64\" \\ ok""#);
        assert_eq!(go_quote(b"err\n"), r#""err\n""#);
        assert_eq!(go_quote(b"\t\r\x07\x08\x0b\x0c"), r#""\t\r\a\b\v\f""#);
        assert_eq!(go_quote(b"\x00\x1b\x7f"), r#""\x00\x1b\x7f""#);
        assert_eq!(go_quote(b"bad\xffutf8\xc3"), r#""bad\xffutf8\xc3""#);
        assert_eq!(go_quote("caf\u{e9} \u{4e16}".as_bytes()), "\"caf\u{e9} \u{4e16}\"");
        assert_eq!(go_quote("\u{85}\u{a0}\u{200b}\u{2028}".as_bytes()), r#""\u0085\u00a0\u200b\u2028""#);
        assert_eq!(go_quote("\u{f0000}".as_bytes()), r#""\U000f0000""#);
        assert_eq!(go_quote(b""), r#""""#);
    }

    #[test]
    fn unquoting_reverses_quoting() {
        for text in [
            &b"plain"[..],
            br#"bad "64" \ ok"#,
            b"err\n",
            b"\t\r\x07\x08\x0b\x0c\x00\x7f",
            b"bad\xffutf8",
            "\u{85}\u{a0}\u{f0000}".as_bytes(),
            b"",
        ] {
            let quoted = go_quote(text);
            assert_eq!(go_unquote(&quoted), Some((text.to_vec(), quoted.len())), "{quoted}");
        }
        // Go's other escapes, and what follows the closing quote.
        assert_eq!(go_unquote(r#""\101\u00e9" rest"#), Some(("A\u{e9}".as_bytes().to_vec(), 12)));
        for bad in ["plain", r#""unterminated"#, r#""\q""#, r#""\x4""#, r#""\u12""#, r#""\ud800""#, r#""\400""#, "\"ends in \\"] {
            assert_eq!(go_unquote(bad), None, "{bad}");
        }
    }

    #[test]
    fn values_are_bare_only_when_logrus_leaves_them_bare() {
        assert_eq!(logfmt_value(b"fatal"), "fatal");
        assert_eq!(logfmt_value(b"a-b.c_d/e@f^g+h9"), "a-b.c_d/e@f^g+h9");
        assert_eq!(logfmt_value(b""), "");
        assert_eq!(logfmt_value(b"two words"), r#""two words""#);
        assert_eq!(logfmt_value(b"2026-01-05T10:00:00Z"), r#""2026-01-05T10:00:00Z""#);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_767_607_205)), "2026-01-05T10:00:05Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_secs(4_102_444_799)), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn fatal_lines_read_back() {
        let t = UNIX_EPOCH + Duration::from_secs(1_767_607_205);
        let msg = b"run pod sandbox: rpc error: code = InvalidArgument desc = default_vcpus \"64\": from 1 to 8";
        let line = fatal_line(t, msg);
        assert_eq!(
            line,
            r#"time="2026-01-05T10:00:05Z" level=fatal msg="run pod sandbox: rpc error: code = InvalidArgument desc = default_vcpus \"64\": from 1 to 8""#
        );
        assert_eq!(fatal_message(&format!("{line}\n")).as_deref(), Some(std::str::from_utf8(msg).unwrap()));
        assert_eq!(fatal_line(t, b"oops"), r#"time="2026-01-05T10:00:05Z" level=fatal msg=oops"#);
        assert_eq!(fatal_message(&fatal_line(t, b"oops")).as_deref(), Some("oops"));
    }

    #[test]
    fn the_fatal_line_is_found_among_others() {
        // crictl v1.32's exec -s of `sh -c 'echo err >&2; exit 3'`, after a warning
        // and a klog line (other libraries crictl uses log to stderr too).
        let stderr = concat!(
            "time=\"2026-01-05T10:00:00Z\" level=warning msg=\"Config \\\"/etc/crictl.yaml\\\" does not exist\"\n",
            "E0105 10:00:00.000000    1234 remote_runtime.go:1] \"ExecSync failed\" err=\"x\"\n",
            "time=\"2026-01-05T10:00:01Z\" level=fatal msg=\"execing command in container c1 synchronously: ",
            "command 'sh -c echo err >&2; exit 3' exited with 3: err\\n\"\n",
        );
        assert_eq!(
            fatal_message(stderr).as_deref(),
            Some("execing command in container c1 synchronously: command 'sh -c echo err >&2; exit 3' exited with 3: err\n")
        );
        // No fatal line: the last error line; none at all: nothing.
        assert_eq!(fatal_message("time=\"x\" level=error msg=\"a b\"\nlevel=info msg=c\n").as_deref(), Some("a b"));
        assert_eq!(fatal_message("vfvm-crictl: plain text\n"), None);
        assert_eq!(fatal_message(""), None);
    }
}

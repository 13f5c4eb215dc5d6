//! The Debian mirror this machine's apt already uses, read from apt's own sources
//! (`/etc/apt/sources.list` and `/etc/apt/sources.list.d/*.{list,sources}`), so the
//! suites the lab adds (`<codename>-backports` for QEMU, `sid` for containerd 2.1) come
//! from the same mirror or proxy as everything else, with the same keyring. No mirror
//! host is written into the code.
//!
//! Both formats of sources.list(5) are read: deb822 stanzas (`Types:`, `URIs:`,
//! `Suites:`, `Components:`, `Signed-By:`, ...; `Enabled: no` skips a stanza) in
//! `*.sources` files, and one-line entries (`deb [options] URI suite [component...]`)
//! in `*.list` files.

use anyhow::{bail, ensure, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where apt reads its sources (apt's `Dir::Etc`).
pub const ETC_APT: &str = "/etc/apt";

/// `deb` (binary packages) or `deb-src` (sources, which the lab never needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    Deb,
    DebSrc,
}

impl EntryType {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "deb" => Some(Self::Deb),
            "deb-src" => Some(Self::DebSrc),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Deb => "deb",
            Self::DebSrc => "deb-src",
        }
    }
}

/// One repository entry: one type, one URI, its suites and components. A deb822
/// stanza with several types or URIs gives one entry per pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEntry {
    pub entry_type: EntryType,
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// The keyring(s) or fingerprints it is verified with, in deb822 form: a
    /// space-separated list, or an embedded ASCII-armoured key (several lines).
    pub signed_by: Option<String>,
    /// `Trusted:`/`trusted=`: a local mirror may be unsigned and trusted explicitly.
    pub trusted: Option<bool>,
    /// The line its stanza or entry starts on, for messages.
    pub line: usize,
}

impl SourceEntry {
    /// A one-line summary for messages (no embedded key).
    fn summary(&self) -> String {
        format!("line {}: {} {} {} {}", self.line, self.entry_type.name(), self.uri, self.suites.join(","), self.components.join(" "))
    }
}

/// A sources file apt reads and what was found in it.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    /// `None` where the file does not exist (only `sources.list` is looked for by name).
    pub entries: Option<Vec<SourceEntry>>,
}

/// Every enabled entry of apt's sources, file by file in the order apt reads them.
#[derive(Clone, Debug)]
pub struct AptSources {
    pub files: Vec<SourceFile>,
    /// Files of `sources.list.d` that apt does not read (e.g. `x.list.disabled`),
    /// named in messages: a source there is not in use.
    pub ignored: Vec<PathBuf>,
}

/// The mirror serving the system's release: where the lab's extra suites come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub uri: String,
    pub signed_by: Option<String>,
    pub trusted: Option<bool>,
    /// Where it was found (file and line), for messages and the written files' comments.
    pub found_in: String,
}

impl Mirror {
    /// A deb822 stanza for `suites` of this mirror (component `main`), keeping its
    /// `Signed-By` and `Trusted`, preceded by a comment saying where it came from.
    pub fn sources_stanza(&self, suites: &[&str]) -> String {
        let mut text = format!("# Written by vfvm-lab: the mirror of {}.\n", self.found_in);
        let _ = writeln!(text, "Types: deb\nURIs: {}\nSuites: {}\nComponents: main", self.uri, suites.join(" "));
        if let Some(keys) = &self.signed_by {
            text.push_str(&deb822_field("Signed-By", keys));
        }
        if let Some(trusted) = self.trusted {
            let _ = writeln!(text, "Trusted: {}", if trusted { "yes" } else { "no" });
        }
        text
    }
}

/// `Name: value` with a multi-line value folded as deb822 wants: continuation lines
/// start with a space, an empty line is written as " .".
fn deb822_field(name: &str, value: &str) -> String {
    let mut lines = value.split('\n');
    let first = lines.next().unwrap_or_default();
    let mut text = if first.is_empty() { format!("{name}:") } else { format!("{name}: {first}") };
    for line in lines {
        text.push_str(if line.is_empty() { "\n ." } else { "\n " });
        text.push_str(line);
    }
    text.push('\n');
    text
}

/// apt's boolean words (`StringToBool`): `None` for anything else.
fn apt_bool(word: &str) -> Option<bool> {
    match word.to_ascii_lowercase().as_str() {
        "yes" | "true" | "with" | "on" | "enable" | "1" => Some(true),
        "no" | "false" | "without" | "off" | "disable" | "0" => Some(false),
        _ => None,
    }
}

/// A `Name: value` line of a deb822 stanza (the value with its continuation lines).
struct Field {
    name: String,
    value: String,
    line: usize,
}

/// The fields of one deb822 stanza and the line it starts on.
struct Stanza {
    first_line: usize,
    fields: Vec<Field>,
}

/// The `deb822` entries of a `*.sources` file's text (`Enabled: no` stanzas left out).
pub fn parse_deb822(text: &str) -> Result<Vec<SourceEntry>> {
    let mut stanzas: Vec<Stanza> = Vec::new();
    let mut current: Option<Stanza> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.starts_with('#') {
            // A comment, anywhere (also inside a stanza, between its fields).
            continue;
        }
        if line.trim().is_empty() {
            stanzas.extend(current.take());
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some(field) = current.as_mut().and_then(|stanza| stanza.fields.last_mut()) else {
                bail!("line {number}: a continuation line (it starts with a space) outside a stanza: {line:?}");
            };
            // " ." is how deb822 writes an empty line inside a value.
            let continued = line.trim();
            field.value.push('\n');
            field.value.push_str(if continued == "." { "" } else { continued });
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            bail!("line {number}: expected `Field: value`, a `#` comment or an empty line, found {line:?}");
        };
        let name = name.trim();
        ensure!(!name.is_empty() && !name.contains(char::is_whitespace), "line {number}: {name:?} is not a field name");
        let field = Field { name: name.to_string(), value: value.trim().to_string(), line: number };
        current.get_or_insert_with(|| Stanza { first_line: number, fields: Vec::new() }).fields.push(field);
    }
    stanzas.extend(current);

    let mut entries = Vec::new();
    for Stanza { first_line, fields } in stanzas {
        // Field names are case-insensitive; the first of a name counts.
        let field = |wanted: &str| fields.iter().find(|field| field.name.eq_ignore_ascii_case(wanted));
        let words = |wanted: &str| field(wanted).map(|field| field.value.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        if let Some(Field { value, line, .. }) = field("Enabled") {
            match apt_bool(value) {
                Some(true) => {}
                Some(false) => continue,
                None => bail!("line {line}: Enabled: {value:?}, expected yes or no"),
            }
        }
        let required = |wanted: &str| {
            words(wanted)
                .filter(|values| !values.is_empty())
                .with_context(|| format!("the stanza at line {first_line} has no {wanted}: field (it needs Types, URIs and Suites)"))
        };
        let (types, uris, suites) = (required("Types")?, required("URIs")?, required("Suites")?);
        let components = words("Components").unwrap_or_default();
        let signed_by = field("Signed-By").map(|field| field.value.clone()).filter(|v| !v.trim().is_empty());
        let trusted = match field("Trusted") {
            Some(Field { value, line, .. }) => {
                Some(apt_bool(value).with_context(|| format!("line {line}: Trusted: {value:?}, expected yes or no"))?)
            }
            None => None,
        };
        for type_word in &types {
            let entry_type = EntryType::parse(type_word)
                .with_context(|| format!("the stanza at line {first_line}: type {type_word:?}, expected deb or deb-src"))?;
            for uri in &uris {
                entries.push(SourceEntry {
                    entry_type,
                    uri: uri.clone(),
                    suites: suites.clone(),
                    components: components.clone(),
                    signed_by: signed_by.clone(),
                    trusted,
                    line: first_line,
                });
            }
        }
    }
    Ok(entries)
}

/// The entries of a one-line `sources.list` file's text:
/// `deb [ key=value[,value] ... ] URI suite [component ...]`, `#` starting a comment
/// (outside the brackets).
pub fn parse_one_line(text: &str) -> Result<Vec<SourceEntry>> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        let (type_word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let entry_type = EntryType::parse(type_word)
            .with_context(|| format!("line {number}: {type_word:?}, expected deb or deb-src (`deb [options] URI suite [component...]`)"))?;
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        let mut trusted = None;
        if let Some(after_bracket) = rest.strip_prefix('[') {
            let (options, after) = after_bracket.split_once(']').with_context(|| format!("line {number}: `[` without `]` in {raw:?}"))?;
            for option in options.split_whitespace() {
                let (key, value) =
                    option.split_once('=').with_context(|| format!("line {number}: option {option:?}, expected key=value"))?;
                match key {
                    // Several keyrings or fingerprints are comma-separated here, space-separated in deb822.
                    "signed-by" => signed_by = Some(value.replace(',', " ")),
                    "trusted" => {
                        trusted = Some(apt_bool(value).with_context(|| format!("line {number}: trusted={value:?}, expected yes or no"))?);
                    }
                    // arch=, lang=, target=, ...: nothing the lab's entries need.
                    _ => {}
                }
            }
            rest = after;
        }
        let mut words = rest.split_whitespace().map(str::to_string);
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            bail!("line {number}: expected `{} [options] URI suite [component...]`, found {raw:?}", entry_type.name());
        };
        entries.push(SourceEntry { entry_type, uri, suites: vec![suite], components: words.collect(), signed_by, trusted, line: number });
    }
    Ok(entries)
}

/// The line up to its first `#` outside `[...]` (as apt cuts one-line entries).
fn strip_comment(line: &str) -> &str {
    let mut in_brackets = false;
    for (at, c) in line.char_indices() {
        match c {
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            '#' if !in_brackets => return &line[..at],
            _ => {}
        }
    }
    line
}

/// Whether apt reads this file of `sources.list.d`: a name ending in `.list` or
/// `.sources`, of letters, digits, `_`, `-` and `.`, not hidden (what apt's
/// `GetListOfFilesInDir` accepts; `foo.list.disabled` or `foo.list~` are ignored).
fn apt_reads(name: &str) -> bool {
    (name.ends_with(".list") || name.ends_with(".sources"))
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl AptSources {
    /// apt's sources under `etc_apt` (normally [`ETC_APT`]): `sources.list`, then
    /// `sources.list.d/` in name order, as apt reads them.
    pub fn read(etc_apt: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let list = etc_apt.join("sources.list");
        let entries = match std::fs::read_to_string(&list) {
            Ok(text) => Some(parse_one_line(&text).with_context(|| format!("reading {} (one-line format)", list.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", list.display())),
        };
        files.push(SourceFile { path: list, entries });

        let parts = etc_apt.join("sources.list.d");
        let mut names = Vec::new();
        let mut ignored = Vec::new();
        match std::fs::read_dir(&parts) {
            Ok(dir) => {
                for entry in dir {
                    let entry = entry.with_context(|| format!("listing {}", parts.display()))?;
                    match entry.file_name().to_str().filter(|n| apt_reads(n)) {
                        Some(name) => names.push(name.to_string()),
                        None => ignored.push(entry.path()),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing {}", parts.display())),
        }
        names.sort();
        ignored.sort();
        for name in names {
            let path = parts.join(&name);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let entries = if name.ends_with(".sources") {
                parse_deb822(&text).with_context(|| format!("reading {} (deb822 format, see sources.list(5))", path.display()))?
            } else {
                parse_one_line(&text).with_context(|| format!("reading {} (one-line format, see sources.list(5))", path.display()))?
            };
            files.push(SourceFile { path, entries: Some(entries) });
        }
        Ok(Self { files, ignored })
    }

    /// This machine's apt sources.
    pub fn system() -> Result<Self> {
        Self::read(Path::new(ETC_APT))
    }

    fn deb_entries(&self) -> impl Iterator<Item = (&Path, &SourceEntry)> {
        self.files
            .iter()
            .flat_map(|file| file.entries.iter().flatten().map(move |entry| (file.path.as_path(), entry)))
            .filter(|(_, entry)| entry.entry_type == EntryType::Deb)
    }

    /// Whether an enabled `deb` entry already has `suite`.
    pub fn has_suite(&self, suite: &str) -> bool {
        self.deb_entries().any(|(_, entry)| entry.suites.iter().any(|s| s == suite))
    }

    /// The first `deb` entry (in apt's reading order) whose suites include `codename`
    /// and whose components include `main`: the release's main archive (not the
    /// `-security` one, whose suite is `<codename>-security`).
    pub fn mirror(&self, codename: &str) -> Result<Mirror> {
        let found = self
            .deb_entries()
            .find(|(_, entry)| entry.suites.iter().any(|s| s == codename) && entry.components.iter().any(|c| c == "main"));
        if let Some((path, entry)) = found {
            return Ok(Mirror {
                uri: entry.uri.clone(),
                signed_by: entry.signed_by.clone(),
                trusted: entry.trusted,
                found_in: format!("{} line {}", path.display(), entry.line),
            });
        }
        let mut read = String::new();
        for file in &self.files {
            let _ = write!(read, "\n  {}", file.path.display());
            match &file.entries {
                None => read.push_str(": absent"),
                Some(entries) if entries.is_empty() => read.push_str(": no enabled entries"),
                Some(entries) => {
                    for entry in entries {
                        let _ = write!(read, "\n    {}", entry.summary());
                    }
                }
            }
        }
        if !self.ignored.is_empty() {
            let names: Vec<String> = self.ignored.iter().map(|path| path.display().to_string()).collect();
            let _ = write!(read, "\n  not read, as apt does not read them (names not ending in .list or .sources): {}", names.join(", "));
        }
        bail!(
            "found no Debian mirror in apt's sources: looked for an enabled `deb` entry whose suites include {codename:?} \
             (VERSION_CODENAME in /etc/os-release) and whose components include \"main\", in the files apt reads \
             (sources.list, and sources.list.d/*.list and *.sources):{read}"
        )
    }
}

/// The system's release codename (`VERSION_CODENAME` in /etc/os-release).
pub fn system_codename() -> Result<String> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    codename_of(&os).context("/etc/os-release has no VERSION_CODENAME: the lab installs its tools from Debian's archive")
}

fn codename_of(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        .filter(|v| !v.is_empty())
}

/// The mirror of this machine's release, from its apt sources.
pub fn system_mirror() -> Result<Mirror> {
    let codename = system_codename()?;
    AptSources::system()?.mirror(&codename)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
# The release and its updates.
Types: deb deb-src
# a comment between fields
URIs: http://mirror.example.org/debian
Suites: bookworm
  bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/example-archive-keyring.gpg
X-Repolib-Name: example

Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/example-archive-keyring.gpg
";

    #[test]
    fn deb822_stanzas_with_comments_and_continuations() {
        let entries = parse_deb822(DEB822).unwrap();
        assert_eq!(entries.len(), 3, "{entries:#?}");
        let main = &entries[0];
        assert_eq!(main.entry_type, EntryType::Deb);
        assert_eq!(main.uri, "http://mirror.example.org/debian");
        assert_eq!(main.suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(main.components, ["main", "contrib"]);
        assert_eq!(main.signed_by.as_deref(), Some("/usr/share/keyrings/example-archive-keyring.gpg"));
        assert_eq!(main.line, 2);
        assert_eq!(entries[1].entry_type, EntryType::DebSrc);
        assert_eq!(entries[2].suites, ["bookworm-security"]);
        assert_eq!(entries[2].line, 11);
    }

    #[test]
    fn deb822_disabled_stanzas_and_field_case() {
        let text = "\
Types: deb
URIs: http://old.example.org/debian
Suites: bookworm
Components: main
Enabled: no

types: deb
uris: http://mirror.example.org/debian http://second.example.org/debian
suites: bookworm
components: main
enabled: yes
trusted: yes
";
        let entries = parse_deb822(text).unwrap();
        let uris: Vec<&str> = entries.iter().map(|e| e.uri.as_str()).collect();
        assert_eq!(uris, ["http://mirror.example.org/debian", "http://second.example.org/debian"]);
        assert_eq!(entries[0].trusted, Some(true));
        assert_eq!(entries[0].signed_by, None);
    }

    #[test]
    fn deb822_embedded_key_survives_a_round_trip() {
        let text = "\
Types: deb
URIs: http://mirror.example.org/debian
Suites: bookworm
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGExampleKey
 -----END PGP PUBLIC KEY BLOCK-----
";
        let entries = parse_deb822(text).unwrap();
        let key = entries[0].signed_by.clone().unwrap();
        assert_eq!(key, "\n-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBGExampleKey\n-----END PGP PUBLIC KEY BLOCK-----");
        let sources = AptSources { files: vec![SourceFile { path: "x.sources".into(), entries: Some(entries) }], ignored: Vec::new() };
        let mirror = sources.mirror("bookworm").unwrap();
        let written = mirror.sources_stanza(&["sid"]);
        assert!(written.contains("Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGExampleKey\n"), "{written}");
        let reread = parse_deb822(&written).unwrap();
        assert_eq!(reread[0].signed_by, Some(key));
        assert_eq!(reread[0].suites, ["sid"]);
    }

    #[test]
    fn deb822_errors_name_the_line() {
        let err = parse_deb822("Types: deb\nthis is not a field\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = parse_deb822("Types: deb\nSuites: bookworm\n").unwrap_err();
        assert!(format!("{err:#}").contains("no URIs"), "{err:#}");
    }

    #[test]
    fn one_line_entries_with_options_and_comments() {
        let text = "\
# deb http://commented.example.org/debian bookworm main
deb-src http://mirror.example.org/debian bookworm main

deb [ arch=amd64 signed-by=/etc/apt/keyrings/a.gpg,/etc/apt/keyrings/b.gpg ] http://mirror.example.org/debian bookworm main non-free # trailing
deb [trusted=yes] http://local.example.org/debian bookworm-backports main
";
        let entries = parse_one_line(text).unwrap();
        assert_eq!(entries.len(), 3, "{entries:#?}");
        assert_eq!(entries[0].entry_type, EntryType::DebSrc);
        let main = &entries[1];
        assert_eq!((main.uri.as_str(), main.line), ("http://mirror.example.org/debian", 4));
        assert_eq!(main.suites, ["bookworm"]);
        assert_eq!(main.components, ["main", "non-free"]);
        assert_eq!(main.signed_by.as_deref(), Some("/etc/apt/keyrings/a.gpg /etc/apt/keyrings/b.gpg"));
        assert_eq!(entries[2].trusted, Some(true));
        assert!(parse_one_line("rpm http://mirror.example.org/x y z\n").is_err());
        assert!(parse_one_line("deb http://mirror.example.org/debian\n").is_err());
    }

    /// A scratch /etc/apt with these files under `sources.list.d/` (and `sources.list`).
    fn scratch_etc_apt(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfvm-lab-apt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sources.list.d")).unwrap();
        for (path, text) in files {
            std::fs::write(dir.join(path), text).unwrap();
        }
        dir
    }

    #[test]
    fn the_mirror_is_the_release_main_archive_and_keeps_its_keyring() {
        let dir = scratch_etc_apt(
            "found",
            &[
                ("sources.list", "deb http://security.example.org/debian-security bookworm-security main\n"),
                ("sources.list.d/debian.sources", DEB822),
                // apt ignores these: so must we.
                ("sources.list.d/other.list.disabled-by-farm", "deb http://ignored.example.org/debian bookworm main\n"),
                ("sources.list.d/.hidden.list", "deb http://ignored.example.org/debian bookworm main\n"),
            ],
        );
        let sources = AptSources::read(&dir).unwrap();
        assert_eq!(sources.files.len(), 2, "{sources:#?}");
        assert_eq!(sources.ignored.len(), 2, "{sources:#?}");
        let mirror = sources.mirror("bookworm").unwrap();
        assert_eq!(mirror.uri, "http://mirror.example.org/debian");
        assert_eq!(mirror.signed_by.as_deref(), Some("/usr/share/keyrings/example-archive-keyring.gpg"));
        assert!(mirror.found_in.ends_with("debian.sources line 2"), "{}", mirror.found_in);
        assert!(sources.has_suite("bookworm-updates"));
        assert!(!sources.has_suite("bookworm-backports"));
        let stanza = mirror.sources_stanza(&["bookworm-backports"]);
        assert!(stanza.contains("\nURIs: http://mirror.example.org/debian\nSuites: bookworm-backports\nComponents: main\n"), "{stanza}");
        assert!(stanza.contains("\nSigned-By: /usr/share/keyrings/example-archive-keyring.gpg\n"), "{stanza}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_mirror_says_what_was_read_and_looked_for() {
        let dir = scratch_etc_apt(
            "missing",
            &[
                ("sources.list.d/security.list", "deb http://mirror.example.org/debian-security bookworm-security main\n"),
                (
                    "sources.list.d/extras.sources",
                    "Types: deb\nURIs: http://mirror.example.org/debian\nSuites: bookworm\nComponents: contrib\n",
                ),
                (
                    "sources.list.d/off.sources",
                    "Enabled: no\nTypes: deb\nURIs: http://mirror.example.org/debian\nSuites: bookworm\nComponents: main\n",
                ),
                ("sources.list.d/main.list.disabled-by-farm", "deb http://mirror.example.org/debian bookworm main\n"),
            ],
        );
        let err = AptSources::read(&dir).unwrap().mirror("bookworm").unwrap_err().to_string();
        for expected in [
            "\"bookworm\"",
            "\"main\"",
            "sources.list: absent",
            "security.list\n    line 1: deb http://mirror.example.org/debian-security bookworm-security main",
            "extras.sources\n    line 1: deb http://mirror.example.org/debian bookworm contrib",
            "off.sources: no enabled entries",
            "not read, as apt does not read them (names not ending in .list or .sources): ",
            "main.list.disabled-by-farm",
        ] {
            assert!(err.contains(expected), "the error should contain {expected:?}:\n{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn codename_from_os_release() {
        assert_eq!(codename_of("NAME=\"Debian\"\nVERSION_CODENAME=bookworm\n").as_deref(), Some("bookworm"));
        assert_eq!(codename_of("VERSION_CODENAME=\"trixie\"\n").as_deref(), Some("trixie"));
        assert_eq!(codename_of("VERSION_CODENAME=\n"), None);
    }

    /// This machine's own apt sources parse (apt reads them, so must we), and on a
    /// Debian-like system with a codename the mirror is found.
    #[test]
    fn this_machines_apt_sources_parse() {
        if !Path::new(ETC_APT).is_dir() {
            return;
        }
        let sources = AptSources::system().unwrap();
        if let Ok(codename) = system_codename() {
            let mirror = sources.mirror(&codename).unwrap();
            eprint!("this machine's {codename}-backports entry would be:\n{}", mirror.sources_stanza(&[&format!("{codename}-backports")]));
        }
    }
}

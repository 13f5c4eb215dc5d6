//! One sandbox's journal on disk: a directory (`<state_dir>/<sandbox>/`) of JSON
//! entries, each written durably before the host change it describes is made. The
//! sandbox's own entry (`sandbox.json`: processes started, mounts made) and one entry
//! per VF taken from the host (`vf-<addr>.json`) live side by side, so recovery reads
//! one place. Every write goes the same way: a temporary file, fsync, rename over the
//! entry, fsync of the directory; a crash leaves the old entry or the new one, never
//! a torn one, and a removal is durable before the caller goes on.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// No entry we write comes near this; a larger file is not ours, and is not read.
const MAX_ENTRY_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {op} failed: {source}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error("journal entry {path} is unusable: {reason}")]
    Format { path: PathBuf, reason: String },
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { path, op, source }
}

/// The journal directory of one sandbox.
#[derive(Clone, Debug)]
pub struct JournalDir {
    dir: PathBuf,
}

impl JournalDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700: it names host devices and processes).
    pub fn create_dir(&self) -> Result<(), JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io(&self.dir, "create"))
    }

    /// Writes entry `name` durably (see the module's doc).
    pub fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), JournalError> {
        self.create_dir()?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| JournalError::Format { path: path.clone(), reason: e.to_string() })?;
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp, "create"))?;
        file.write_all(&bytes).map_err(io(&tmp, "write"))?;
        file.sync_all().map_err(io(&tmp, "fsync"))?;
        std::fs::rename(&tmp, &path).map_err(io(&path, "rename"))?;
        self.sync_dir()
    }

    /// Entry `name`, or `None` when there is none.
    pub fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, JournalError> {
        let path = self.dir.join(name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, "open")(e)),
        };
        let len = file.metadata().map_err(io(&path, "stat"))?.len();
        if len > MAX_ENTRY_BYTES {
            return Err(JournalError::Format { path, reason: format!("{len} bytes, more than an entry can be") });
        }
        let mut bytes = Vec::new();
        file.take(MAX_ENTRY_BYTES).read_to_end(&mut bytes).map_err(io(&path, "read"))?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| JournalError::Format { path, reason: e.to_string() })
    }

    /// Deletes entry `name`, durably; an absent one is fine.
    pub fn remove(&self, name: &str) -> Result<(), JournalError> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "remove")(e)),
        }
    }

    /// The names of the entries that start with `prefix` and end with `.json`, sorted.
    pub fn names(&self, prefix: &str) -> Result<Vec<String>, JournalError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir, "list")(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
            .collect();
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir, "fsync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_list_and_go() {
        let dir = std::env::temp_dir().join(format!("vfvm-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = JournalDir::new(&dir);
        assert_eq!(j.read::<Vec<u32>>("a.json").unwrap(), None);
        j.write("vf-1.json", &vec![1u32]).unwrap();
        j.write("vf-0.json", &vec![0u32]).unwrap();
        j.write("sandbox.json", &vec![9u32]).unwrap();
        j.write("vf-1.json", &vec![1u32, 1]).unwrap();
        assert_eq!(j.read::<Vec<u32>>("vf-1.json").unwrap(), Some(vec![1, 1]));
        assert_eq!(j.names("vf-").unwrap(), vec!["vf-0.json", "vf-1.json"]);
        assert!(!dir.join("vf-1.json.tmp").exists(), "no temporary file is left");
        j.remove("vf-0.json").unwrap();
        j.remove("vf-0.json").unwrap();
        assert_eq!(j.names("vf-").unwrap(), vec!["vf-1.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_oversized_or_garbled_entry_is_named_not_read() {
        let dir = std::env::temp_dir().join(format!("vfvm-journal-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = JournalDir::new(&dir);
        j.create_dir().unwrap();
        std::fs::write(dir.join("big.json"), vec![b' '; usize::try_from(MAX_ENTRY_BYTES + 1).unwrap()]).unwrap();
        let e = j.read::<u32>("big.json").unwrap_err().to_string();
        assert!(e.contains("big.json") && e.contains("more than an entry can be"), "{e}");
        std::fs::write(dir.join("bad.json"), "{not json").unwrap();
        let e = j.read::<u32>("bad.json").unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("unusable"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

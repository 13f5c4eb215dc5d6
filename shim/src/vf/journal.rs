//! The journal: for each VF taken from the host, everything needed to give it back,
//! written atomically and fsynced before the first change is made. Restore is driven
//! by it and deletes the entry last, so a crash at any point leaves a record.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::discover::VfIdentity;
use super::pci::PciAddress;
use super::VfError;

/// Bump when the record's meaning changes; older shims refuse newer records.
pub const JOURNAL_VERSION: u32 = 1;
/// No legitimate record comes near this; a larger file is corrupt, not read.
const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// PF-side settings of a VF (the PF driver's view, via `ip link set <pf> vf N ...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PfVfSettings {
    pub mac: String,
    pub vlan: u32,
    pub qos: u32,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
}

/// An address on a netdev, `addr/prefix`, with the flags that can be set on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRecord {
    pub addr: String,
    pub prefix: u8,
    #[serde(default)]
    pub flags: u32,
    #[serde(default)]
    pub route_metric: Option<u32>,
}

/// A route through the netdev (kernel-made routes excluded: they come back with the
/// addresses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// The destination network; the unspecified address with prefix 0 for a default.
    pub dst: String,
    pub prefix: u8,
    pub gateway: Option<String>,
    pub metric: Option<u32>,
    pub prefsrc: Option<String>,
    pub table: u32,
    pub scope: u8,
    pub protocol: u8,
    #[serde(default)]
    pub onlink: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourRecord {
    pub addr: String,
    pub lladdr: String,
}

/// A VF netdev as CNI left it in the pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetdevRecord {
    pub name: String,
    pub altnames: Vec<String>,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub addrs: Vec<AddrRecord>,
    pub routes: Vec<RouteRecord>,
    pub neighbours: Vec<NeighbourRecord>,
}

/// One VF taken from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfRecord {
    pub version: u32,
    pub sandbox_id: String,
    /// What the VF is on the host (address, PF, driver, ...), as discovery found it.
    #[serde(flatten)]
    pub vf: VfIdentity,
    /// The pod network namespace the netdev was in, if it had one there.
    pub netns: Option<PathBuf>,
    /// `None` for a VF without a netdev (already on vfio-pci, DPDK style).
    pub netdev: Option<NetdevRecord>,
    /// The PF's settings for this VF, when the PF has a netdev to ask.
    pub pf_settings: Option<PfVfSettings>,
}

/// The journal directory of one sandbox.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

fn journal_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> VfError {
    let path = path.to_path_buf();
    move |source| VfError::Journal { op, path, source }
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, addr: PciAddress) -> PathBuf {
        self.dir.join(format!("vf-{addr}.json"))
    }

    /// Writes the record durably: temp file, fsync, rename over the entry, fsync dir.
    pub fn write(&self, record: &VfRecord) -> Result<(), VfError> {
        std::fs::create_dir_all(&self.dir).map_err(journal_err(&self.dir, "create"))?;
        let path = self.entry_path(record.vf.addr);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| VfError::JournalFormat { path: path.clone(), reason: e.to_string() })?;
        let mut file = std::fs::File::create(&tmp).map_err(journal_err(&tmp, "create"))?;
        file.write_all(&bytes).map_err(journal_err(&tmp, "write"))?;
        file.sync_all().map_err(journal_err(&tmp, "fsync"))?;
        std::fs::rename(&tmp, &path).map_err(journal_err(&path, "rename"))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(journal_err(&self.dir, "fsync"))?;
        Ok(())
    }

    pub fn read(&self, addr: PciAddress) -> Result<Option<VfRecord>, VfError> {
        let path = self.entry_path(addr);
        if !path.exists() {
            return Ok(None);
        }
        read_entry(&path).map(Some)
    }

    /// Every record in the journal, in PCI address order.
    pub fn read_all(&self) -> Result<Vec<VfRecord>, VfError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(journal_err(&self.dir, "list")(e)),
        };
        let mut records = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("vf-") && name.ends_with(".json") {
                records.push(read_entry(&entry.path())?);
            }
        }
        records.sort_by_key(|r| r.vf.addr);
        Ok(records)
    }

    /// Deletes the record (the last step of a restore), durably. Absent is fine.
    pub fn remove(&self, addr: PciAddress) -> Result<(), VfError> {
        let path = self.entry_path(addr);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(journal_err(&path, "remove")(e)),
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(journal_err(&self.dir, "fsync"))
    }
}

fn read_entry(path: &Path) -> Result<VfRecord, VfError> {
    let meta = std::fs::metadata(path).map_err(journal_err(path, "stat"))?;
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(VfError::JournalFormat {
            path: path.to_path_buf(),
            reason: format!("{} bytes, more than a record can be", meta.len()),
        });
    }
    let bytes = std::fs::read(path).map_err(journal_err(path, "read"))?;
    let record: VfRecord =
        serde_json::from_slice(&bytes).map_err(|e| VfError::JournalFormat { path: path.to_path_buf(), reason: e.to_string() })?;
    if record.version > JOURNAL_VERSION {
        return Err(VfError::JournalFormat {
            path: path.to_path_buf(),
            reason: format!("record version {} is newer than this shim's {JOURNAL_VERSION}", record.version),
        });
    }
    Ok(record)
}

//! The VF entries of a sandbox's journal (see [`crate::journal`]): for each VF taken
//! from the host, everything needed to give it back, written durably before the first
//! change is made. Restore is driven by them and deletes the entry last, so a crash
//! at any point leaves a record.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::journal::{JournalDir, JournalError};

use super::discover::VfIdentity;
use super::pci::PciAddress;
use super::VfError;

/// Bump when the record's meaning changes; older shims refuse newer records.
pub const JOURNAL_VERSION: u32 = 1;
/// A VF's entry in the journal directory: `vf-<PCI address>.json`.
pub const ENTRY_PREFIX: &str = "vf-";

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

/// One entry as [`Journal::read_each`] found it: the VF its name gives, and the
/// record, or why it is unusable.
pub type JournalEntry = (Option<PciAddress>, Result<VfRecord, VfError>);

/// The VF entries (`vf-<addr>.json`) of one sandbox's journal ([`JournalDir`]).
#[derive(Clone, Debug)]
pub struct Journal {
    store: JournalDir,
}

impl Journal {
    /// The VF entries in the journal directory `dir` (the sandbox's state directory).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { store: JournalDir::new(dir) }
    }

    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    fn entry_name(addr: PciAddress) -> String {
        format!("{ENTRY_PREFIX}{addr}.json")
    }

    /// Writes the record durably, before the first change to the VF.
    pub fn write(&self, record: &VfRecord) -> Result<(), VfError> {
        Ok(self.store.write(&Self::entry_name(record.vf.addr), record)?)
    }

    pub fn read(&self, addr: PciAddress) -> Result<Option<VfRecord>, VfError> {
        let name = Self::entry_name(addr);
        self.store.read::<VfRecord>(&name)?.map(|r| self.checked(&name, r)).transpose()
    }

    /// Every record in the journal, in PCI address order.
    pub fn read_all(&self) -> Result<Vec<VfRecord>, VfError> {
        let mut records = Vec::new();
        for name in self.store.names(ENTRY_PREFIX)? {
            if let Some(r) = self.store.read::<VfRecord>(&name)? {
                records.push(self.checked(&name, r)?);
            }
        }
        records.sort_by_key(|r| r.vf.addr);
        Ok(records)
    }

    /// Every entry of the journal, each read on its own, so that one unusable entry
    /// does not keep the others from being given back. The entry's VF comes from its
    /// name, for the unusable ones too; fails only if the directory cannot be listed.
    pub fn read_each(&self) -> Result<Vec<JournalEntry>, VfError> {
        let mut entries = Vec::new();
        for name in self.store.names(ENTRY_PREFIX)? {
            let addr = name.strip_prefix(ENTRY_PREFIX).and_then(|n| n.strip_suffix(".json")).and_then(|a| a.parse().ok());
            let record = match self.store.read::<VfRecord>(&name) {
                Ok(Some(r)) if addr != Some(r.vf.addr) => Err(JournalError::Format {
                    path: self.store.dir().join(&name),
                    reason: format!("it holds VF {}, not the one its name gives", r.vf.addr),
                }
                .into()),
                Ok(Some(r)) => self.checked(&name, r),
                // Gone since the listing: given back meanwhile.
                Ok(None) => continue,
                Err(e) => Err(e.into()),
            };
            entries.push((addr, record));
        }
        Ok(entries)
    }

    /// Deletes the record (the last step of a restore), durably. Absent is fine.
    pub fn remove(&self, addr: PciAddress) -> Result<(), VfError> {
        Ok(self.store.remove(&Self::entry_name(addr))?)
    }

    fn checked(&self, name: &str, record: VfRecord) -> Result<VfRecord, VfError> {
        if record.version > JOURNAL_VERSION {
            return Err(JournalError::Format {
                path: self.store.dir().join(name),
                reason: format!("record version {} is newer than this shim's {JOURNAL_VERSION}", record.version),
            }
            .into());
        }
        Ok(record)
    }
}

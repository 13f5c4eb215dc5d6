//! What sriov-cni cached about its attachments (`/var/lib/cni/sriov/<container>-<if>`),
//! read to confirm that a VF found in a pod's netns is the one CNI attached there.
//! Read only: sriov-cni's DEL needs these files as it wrote them.
//!
//! Both layouts are read: older sriov-cni wrote the container's interface name as
//! `ContIFNames`; v2.x leaves it out (the file name carries it, after the container
//! id, which is hex) and keeps the VF's host side in `OrigVfState` (`HostIFName`,
//! `AdminMAC`, `EffectiveMAC`, `SpoofChk`, `Trust`, `Vlan`, ...).

use serde::Deserialize;
use std::path::Path;

use super::pci::PciAddress;

/// Where sriov-cni keeps its cache by default.
pub const DEFAULT_DIR: &str = "/var/lib/cni/sriov";
/// A cache file is a small JSON NetConf; larger files are not sriov-cni's.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Files looked at per scan: a directory this full is not read further.
const MAX_FILES: usize = 4096;

/// The fields of sriov-cni's cached NetConf that identify an attachment.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CniAttachment {
    #[serde(rename = "deviceID")]
    pub device_id: String,
    #[serde(rename = "VFID", default)]
    pub vf_index: u32,
    #[serde(rename = "Master", default)]
    pub pf_netdev: String,
    /// From `ContIFNames`, or (v2.x) the file name's part after the container id.
    #[serde(rename = "ContIFNames", default)]
    pub container_ifname: String,
    #[serde(rename = "DPDKMode", default)]
    pub dpdk_mode: bool,
    /// The VF netdev's name in the host netns before CNI ADD (v2.x), if cached.
    #[serde(skip)]
    pub host_ifname: Option<String>,
}

#[derive(Deserialize)]
struct CachedNetConf {
    #[serde(flatten)]
    attachment: CniAttachment,
    #[serde(rename = "OrigVfState", default)]
    orig: Option<OrigVfState>,
}

#[derive(Deserialize)]
struct OrigVfState {
    #[serde(rename = "HostIFName", default)]
    host_ifname: String,
}

/// One cache file's attachment; `file_name` is `<container id>-<ifname>`.
fn parse(file_name: &str, bytes: &[u8]) -> Option<CniAttachment> {
    let cached: CachedNetConf = serde_json::from_slice(bytes).ok()?;
    let mut a = cached.attachment;
    if a.container_ifname.is_empty() {
        a.container_ifname = file_name.split_once('-').map(|(_, ifname)| ifname.to_string()).unwrap_or_default();
    }
    a.host_ifname = cached.orig.map(|o| o.host_ifname).filter(|n| !n.is_empty());
    Some(a)
}

/// The cached attachment of `addr`, if sriov-cni left one. Unreadable or foreign files
/// are skipped: the cache confirms, it never decides.
pub fn attachment_for(dir: &Path, addr: PciAddress) -> Option<CniAttachment> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .take(MAX_FILES)
        .filter(|e| e.metadata().map(|m| m.is_file() && m.len() <= MAX_FILE_BYTES).unwrap_or(false))
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).ok()?)))
        .filter_map(|(name, bytes)| parse(&name, &bytes))
        .find(|a| a.device_id.parse::<PciAddress>().ok() == Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_attachment_by_pci_address_and_skips_junk() {
        let dir = std::env::temp_dir().join(format!("vfvm-cni-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // As sriov-cni writes it (fields abridged).
        std::fs::write(
            dir.join("6a8c7e8f0b1d-net1"),
            r#"{"cniVersion":"0.3.1","name":"sriov-net","type":"sriov","OrigVfState":{"HostIFName":"enp1s0v2","SpoofChk":true,"AdminMAC":"00:00:00:00:00:00","EffectiveMAC":"aa:bb:cc:dd:ee:02","Vlan":0,"VlanQoS":0,"MinTxRate":0,"MaxTxRate":0,"LinkState":0},"DPDKMode":false,"Master":"enp1s0","MAC":"","vlan":0,"vlanQoS":0,"deviceID":"0000:01:10.4","VFID":2,"ContIFNames":"net1"}"#,
        )
        .unwrap();
        std::fs::write(dir.join("garbage"), "not json").unwrap();
        std::fs::write(dir.join("huge"), vec![b'{'; 100_000]).unwrap();
        std::fs::write(dir.join("other-net1"), r#"{"deviceID":"0000:01:10.0","VFID":0,"Master":"enp1s0","ContIFNames":"net1"}"#).unwrap();
        let got = attachment_for(&dir, "0000:01:10.4".parse().unwrap()).unwrap();
        assert_eq!(
            got,
            CniAttachment {
                device_id: "0000:01:10.4".into(),
                vf_index: 2,
                pf_netdev: "enp1s0".into(),
                container_ifname: "net1".into(),
                dpdk_mode: false,
                host_ifname: Some("enp1s0v2".into()),
            }
        );
        // sriov-cni v2.x: no ContIFNames; the file name says the interface.
        std::fs::write(
            dir.join("0123456789abcdef-eth1"),
            r#"{"cniVersion":"1.0.0","name":"sriov-net","type":"sriov","OrigVfState":{"HostIFName":"eth5","SpoofChk":true,"Trust":false,"AdminMAC":"00:00:00:00:00:00","EffectiveMAC":"aa:bb:cc:dd:ee:06","Vlan":0,"VlanQoS":0,"VlanProto":33024,"MinTxRate":0,"MaxTxRate":0,"LinkState":0,"MTU":1500},"Master":"enp1s0","MAC":"","MTU":null,"vlan":null,"vlanQoS":null,"vlanProto":null,"deviceID":"0000:01:10.6","VFID":3,"min_tx_rate":null,"max_tx_rate":null}"#,
        )
        .unwrap();
        let v2 = attachment_for(&dir, "0000:01:10.6".parse().unwrap()).unwrap();
        assert_eq!((v2.container_ifname.as_str(), v2.vf_index, v2.host_ifname.as_deref()), ("eth1", 3, Some("eth5")));
        assert!(attachment_for(&dir, "0000:01:10.2".parse().unwrap()).is_none());
        assert!(attachment_for(Path::new("/nonexistent/dir"), "0000:01:10.4".parse().unwrap()).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

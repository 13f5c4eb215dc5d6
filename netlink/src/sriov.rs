//! SR-IOV VF settings, read and written through the PF.

use netlink_packet_core::NlasIterator;
use netlink_packet_route::link::{
    LinkAttribute, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac, VfInfoRate, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan,
    VfLinkState as NlVfLinkState,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::error::Result;
use crate::socket::{Ctx, Handle, Kind};
use crate::types::{MacAddr, VfConfig, VfLinkState};

const RTM_NEWLINK: u16 = 16;
const IFINFOMSG_LEN: usize = 16;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_VLAN: u16 = 2;
const IFLA_VF_SPOOFCHK: u16 = 4;
const IFLA_VF_LINK_STATE: u16 = 5;
const IFLA_VF_RATE: u16 = 6;
const IFLA_VF_TRUST: u16 = 9;
/// Type bits of `nla_type` (without NLA_F_NESTED / NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

fn u32s(b: &[u8], n: usize) -> Option<Vec<u32>> {
    if b.len() < n * 4 {
        return None;
    }
    Some(b.chunks_exact(4).take(n).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The kernel reports -1 (u32::MAX) for a setting the driver does not report.
fn tri(v: u32) -> Option<bool> {
    (v != u32::MAX).then_some(v != 0)
}

/// Parses one IFLA_VF_INFO nest. Parsed by hand (not via netlink-packet-route)
/// to tell "off" from "not reported by the driver".
fn parse_vf(ctx: &Ctx<'_>, nest: &[u8]) -> Result<VfConfig> {
    let bad = |what: &str| ctx.protocol(format!("malformed {what} in IFLA_VF_INFO"));
    let mut vf: Option<u32> = None;
    let mut c = VfConfig {
        vf: 0,
        mac: MacAddr::default(),
        vlan: 0,
        qos: 0,
        spoofchk: None,
        trust: None,
        link_state: None,
        min_tx_rate: None,
        max_tx_rate: None,
    };
    for nla in NlasIterator::new(nest) {
        let nla = nla.map_err(|e| ctx.protocol(format!("bad IFLA_VF_INFO attribute: {e}")))?;
        let v = nla.value();
        match nla.kind() & NLA_TYPE_MASK {
            IFLA_VF_MAC => {
                let id = u32s(v, 1).ok_or_else(|| bad("IFLA_VF_MAC"))?[0];
                let mac = v.get(4..10).and_then(MacAddr::from_slice).ok_or_else(|| bad("IFLA_VF_MAC"))?;
                vf = Some(id);
                c.mac = mac;
            }
            IFLA_VF_VLAN => {
                let x = u32s(v, 3).ok_or_else(|| bad("IFLA_VF_VLAN"))?;
                vf = Some(x[0]);
                c.vlan = u16::try_from(x[1]).map_err(|_| bad("IFLA_VF_VLAN"))?;
                c.qos = u8::try_from(x[2]).map_err(|_| bad("IFLA_VF_VLAN"))?;
            }
            IFLA_VF_SPOOFCHK => {
                let x = u32s(v, 2).ok_or_else(|| bad("IFLA_VF_SPOOFCHK"))?;
                c.spoofchk = tri(x[1]);
            }
            IFLA_VF_TRUST => {
                let x = u32s(v, 2).ok_or_else(|| bad("IFLA_VF_TRUST"))?;
                c.trust = tri(x[1]);
            }
            IFLA_VF_LINK_STATE => {
                let x = u32s(v, 2).ok_or_else(|| bad("IFLA_VF_LINK_STATE"))?;
                c.link_state = Some(VfLinkState::from(x[1]));
            }
            IFLA_VF_RATE => {
                let x = u32s(v, 3).ok_or_else(|| bad("IFLA_VF_RATE"))?;
                c.min_tx_rate = Some(x[1]);
                c.max_tx_rate = Some(x[2]);
            }
            _ => {}
        }
    }
    c.vf = vf.ok_or_else(|| bad("VF without IFLA_VF_MAC/IFLA_VF_VLAN"))?;
    Ok(c)
}

impl Handle {
    /// The settings of every VF of the PF `pf_index` (`RTM_GETLINK` with
    /// `IFLA_EXT_MASK` = `RTEXT_FILTER_VF`), in VF order. Empty when the device
    /// has no VFs (or is not a PF).
    pub fn vf_configs(&self, pf_index: u32) -> Result<Vec<VfConfig>> {
        let object = format!("of PF link {pf_index}");
        let ctx = Ctx { op: "get VF configs", object: &object };
        let raw = self.link_with_vfs_raw(&ctx, pf_index)?;
        let hdr =
            netlink_packet_core::NetlinkBuffer::new_checked(&raw[..]).map_err(|e| ctx.protocol(format!("bad netlink header: {e}")))?;
        if hdr.message_type() != RTM_NEWLINK {
            return Err(ctx.protocol(format!("answer of type {} instead of RTM_NEWLINK", hdr.message_type())));
        }
        let attrs = raw.get(16 + IFINFOMSG_LEN..).ok_or_else(|| ctx.protocol("truncated RTM_NEWLINK"))?;
        let mut out = Vec::new();
        for nla in NlasIterator::new(attrs) {
            let nla = nla.map_err(|e| ctx.protocol(format!("bad link attribute: {e}")))?;
            if nla.kind() & NLA_TYPE_MASK != IFLA_VFINFO_LIST {
                continue;
            }
            for info in NlasIterator::new(nla.value()) {
                let info = info.map_err(|e| ctx.protocol(format!("bad IFLA_VFINFO_LIST entry: {e}")))?;
                if info.kind() & NLA_TYPE_MASK == IFLA_VF_INFO {
                    out.push(parse_vf(&ctx, info.value())?);
                }
            }
        }
        out.sort_by_key(|c| c.vf);
        Ok(out)
    }

    /// The settings of VF `vf` of PF `pf_index` ([`crate::Error::NotFound`] if
    /// the PF has no such VF).
    pub fn vf_config(&self, pf_index: u32, vf: u32) -> Result<VfConfig> {
        let object = format!("VF {vf} of PF link {pf_index}");
        self.vf_configs(pf_index)?.into_iter().find(|c| c.vf == vf).ok_or_else(|| Ctx { op: "get VF config", object: &object }.not_found())
    }

    fn set_vf(&self, op: &'static str, pf_index: u32, vf: u32, what: String, info: VfInfo) -> Result<()> {
        let object = format!("VF {vf} of PF link {pf_index} to {what}");
        let ctx = Ctx { op, object: &object };
        let mut msg = LinkMessage::default();
        msg.header.index = pf_index;
        msg.attributes.push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
        self.request(&ctx, RouteNetlinkMessage::SetLink(msg), 0, Kind::Ack)?;
        Ok(())
    }

    /// Sets the VF's administrative MAC (all zeroes clears it on drivers that
    /// support that, e.g. igb).
    pub fn set_vf_mac(&self, pf_index: u32, vf: u32, mac: MacAddr) -> Result<()> {
        self.set_vf("set MAC of", pf_index, vf, mac.to_string(), VfInfo::Mac(VfInfoMac::new(vf, &mac.0)))
    }

    /// Sets the VF's port VLAN (802.1Q; 0 = none) and priority (0..=7).
    pub fn set_vf_vlan(&self, pf_index: u32, vf: u32, vlan: u16, qos: u8) -> Result<()> {
        self.set_vf(
            "set VLAN of",
            pf_index,
            vf,
            format!("vlan {vlan} qos {qos}"),
            VfInfo::Vlan(VfInfoVlan::new(vf, u32::from(vlan), u32::from(qos))),
        )
    }

    /// Turns MAC/VLAN spoof checking on or off.
    pub fn set_vf_spoofchk(&self, pf_index: u32, vf: u32, on: bool) -> Result<()> {
        self.set_vf(
            "set spoofchk of",
            pf_index,
            vf,
            if on { "on" } else { "off" }.into(),
            VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, on)),
        )
    }

    /// Turns VF trust on or off.
    pub fn set_vf_trust(&self, pf_index: u32, vf: u32, on: bool) -> Result<()> {
        self.set_vf("set trust of", pf_index, vf, if on { "on" } else { "off" }.into(), VfInfo::Trust(VfInfoTrust::new(vf, on)))
    }

    /// Sets the VF's administrative link state (EOPNOTSUPP on drivers without it, e.g. igb).
    pub fn set_vf_link_state(&self, pf_index: u32, vf: u32, state: VfLinkState) -> Result<()> {
        let nl = match state {
            VfLinkState::Auto => NlVfLinkState::Auto,
            VfLinkState::Enable => NlVfLinkState::Enable,
            VfLinkState::Disable => NlVfLinkState::Disable,
            VfLinkState::Other(o) => NlVfLinkState::Other(o),
        };
        self.set_vf("set link state of", pf_index, vf, format!("{state:?}"), VfInfo::LinkState(VfInfoLinkState::new(vf, nl)))
    }

    /// Sets the VF's min/max TX rate in Mbit/s (0 = unlimited).
    pub fn set_vf_rate(&self, pf_index: u32, vf: u32, min_mbps: u32, max_mbps: u32) -> Result<()> {
        self.set_vf(
            "set TX rate of",
            pf_index,
            vf,
            format!("min {min_mbps} max {max_mbps} Mbit/s"),
            VfInfo::Rate(VfInfoRate::new(vf, min_mbps, max_mbps)),
        )
    }
}

//! Traffic control for connecting two links back to back (Kata's "tcfilter" model):
//! an ingress qdisc on each, and on it one filter that matches every frame (u32 with
//! one key of mask 0: in every kernel that has tc, unlike matchall) whose mirred action
//! redirects every frame that arrives to the other link's egress. So a pod's veth and
//! a VM's tap forward each other's traffic in both directions with no bridge and no
//! change to either link's addresses or MAC.
//!
//! Deleting a link's ingress qdisc deletes its filters with it.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute, TcFilterU32Option,
    TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::error::Result;
use crate::socket::{Ctx, Handle, Kind};

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// ETH_P_ALL in network byte order, as a filter's protocol.
const ETH_P_ALL_BE: u32 = 0x0300;
/// `TCA_ACT_TAB`-style index of the first action of a filter.
const FIRST_ACTION: u16 = 1;

fn ingress_qdisc(ifindex: u32) -> TcMessage {
    let mut m = TcMessage::with_index(i32::try_from(ifindex).unwrap_or(i32::MAX));
    m.header.handle = INGRESS_HANDLE;
    m.header.parent = TcHandle::INGRESS;
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

impl Handle {
    /// Adds the ingress qdisc (`ffff:`) to link `ifindex`; EEXIST if it has one.
    pub fn add_ingress_qdisc(&self, ifindex: u32) -> Result<()> {
        let object = format!("on link {ifindex}");
        let ctx = Ctx { op: "add ingress qdisc", object: &object };
        self.request(&ctx, RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(ifindex)), NLM_F_CREATE | NLM_F_EXCL, Kind::Ack)?;
        Ok(())
    }

    /// Deletes link `ifindex`'s ingress qdisc and its filters (an error if it has none:
    /// the kernel's EINVAL or ENOENT).
    pub fn delete_ingress_qdisc(&self, ifindex: u32) -> Result<()> {
        let object = format!("on link {ifindex}");
        let ctx = Ctx { op: "delete ingress qdisc", object: &object };
        self.request(&ctx, RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(ifindex)), 0, Kind::Ack)?;
        Ok(())
    }

    /// Whether link `ifindex` has an ingress qdisc.
    pub fn has_ingress_qdisc(&self, ifindex: u32) -> Result<bool> {
        let ctx = Ctx { op: "list", object: "qdiscs" };
        let answer = self.request(&ctx, RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), 0, Kind::Dump)?;
        Ok(answer.iter().any(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => {
                i64::from(q.header.index) == i64::from(ifindex)
                    && q.header.parent == TcHandle::INGRESS
                    && q.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "ingress"))
            }
            _ => false,
        }))
    }

    /// On link `from`'s ingress qdisc, a filter redirecting every frame to link `to`'s
    /// egress (`tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
    /// action mirred egress redirect dev TO`).
    pub fn redirect_ingress(&self, from: u32, to: u32) -> Result<()> {
        let object = format!("link {from} to link {to}");
        let ctx = Ctx { op: "add redirect filter", object: &object };
        let mut m = TcMessage::with_index(i32::try_from(from).unwrap_or(i32::MAX));
        m.header.parent = INGRESS_HANDLE;
        // Priority 0: the kernel picks one. Protocol: all.
        m.header.info = ETH_P_ALL_BE;
        // The library's structs are non-exhaustive: built from their defaults.
        let mut generic = TcActionGeneric::default();
        generic.action = TcActionType::Stolen;
        let mut mirred = TcMirror::default();
        mirred.generic = generic;
        mirred.eaction = TcMirrorActionType::EgressRedir;
        mirred.ifindex = to;
        let mut action = TcAction::default();
        action.tab = FIRST_ACTION;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirred))]),
        ];
        let mut key = TcU32Key::default();
        key.mask = 0;
        key.val = 0;
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![key];
        m.attributes.push(TcAttribute::Kind("u32".into()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(&ctx, RouteNetlinkMessage::NewTrafficFilter(m), NLM_F_CREATE | NLM_F_EXCL, Kind::Ack)?;
        Ok(())
    }

    /// The links that link `ifindex`'s ingress filters redirect to (mirred egress
    /// redirect actions of u32 filters), in the kernel's order.
    pub fn ingress_redirects(&self, ifindex: u32) -> Result<Vec<u32>> {
        let object = format!("ingress filters of link {ifindex}");
        let ctx = Ctx { op: "list", object: &object };
        let mut m = TcMessage::with_index(i32::try_from(ifindex).unwrap_or(i32::MAX));
        m.header.parent = INGRESS_HANDLE;
        let answer = self.request(&ctx, RouteNetlinkMessage::GetTrafficFilter(m), 0, Kind::Dump)?;
        let mut targets = Vec::new();
        for msg in answer {
            let RouteNetlinkMessage::NewTrafficFilter(f) = msg else { continue };
            for attr in &f.attributes {
                let TcAttribute::Options(options) = attr else { continue };
                for option in options {
                    let TcOption::U32(TcFilterU32Option::Action(actions)) = option else { continue };
                    for action in actions {
                        for a in &action.attributes {
                            let TcActionAttribute::Options(opts) = a else { continue };
                            for o in opts {
                                if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = o {
                                    if p.eaction == TcMirrorActionType::EgressRedir {
                                        targets.push(p.ifindex);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(targets)
    }
}

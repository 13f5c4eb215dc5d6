//! The pod network's words shared by the shim (its `[network]` config) and the VMM
//! (`--net ...,datapath=`).

use serde::Deserialize;

/// Who moves a pod interface's frames between its tap and the guest's rings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// vhost-net when `/dev/vhost-net` opens and every queue has its own interrupt
    /// vector, the VMM's own threads otherwise.
    #[default]
    Auto,
    /// vhost-net, or the device fails to start (and so the pod).
    Vhost,
    /// The VMM's own worker threads.
    Userspace,
}

impl Datapath {
    /// The word on the VMM's command line and in the config.
    pub fn as_arg(self) -> &'static str {
        match self {
            Datapath::Auto => "auto",
            Datapath::Vhost => "vhost",
            Datapath::Userspace => "userspace",
        }
    }
}

impl std::str::FromStr for Datapath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Datapath::Auto, Datapath::Vhost, Datapath::Userspace]
            .into_iter()
            .find(|d| d.as_arg() == s)
            .ok_or_else(|| format!("{s:?}: expected auto, vhost or userspace"))
    }
}

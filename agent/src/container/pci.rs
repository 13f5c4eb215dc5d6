//! `PCIDEVICE_*` env rewriting: the sriov-network-device-plugin puts the host's PCI
//! addresses of a pod's devices in the container env; inside the VM the same
//! devices sit at other addresses. The shim sends the map (host -> guest).

use std::collections::{BTreeMap, HashMap};

use vfvm_protocols::PciAddress;

use super::{Error, MAX_PCI_MAP};

/// Host -> guest PCI addresses of a sandbox's passed-through devices.
pub type PciAddressMap = BTreeMap<PciAddress, PciAddress>;

/// Decodes the agent API's `pci_address_map` (at most [`MAX_PCI_MAP`] entries): every
/// key and value must be a PCI address; a malformed one is named, quoted.
pub fn address_map(raw: HashMap<String, String>) -> Result<PciAddressMap, Error> {
    if raw.len() > MAX_PCI_MAP {
        return Err(Error::Invalid(format!("pci_address_map: {} entries, at most {MAX_PCI_MAP}", raw.len())));
    }
    let parse = |side: &str, text: &str| text.parse::<PciAddress>().map_err(|e| Error::Invalid(format!("pci_address_map {side}: {e}")));
    raw.iter().map(|(host, guest)| Ok((parse("key", host)?, parse("value", guest)?))).collect()
}

/// The guest address for a host address written as text, if it is one the map knows.
fn guest_address(map: &PciAddressMap, text: &str) -> Option<String> {
    text.parse::<PciAddress>().ok().and_then(|host| map.get(&host)).map(ToString::to_string)
}

/// Rewrites `PCIDEVICE_<RESOURCE>=<addr>[,<addr>...]` and the
/// `PCIDEVICE_<RESOURCE>_INFO` JSON in `env` (as `KEY=VALUE` strings). Returns a
/// warning for each address not in the map (left unchanged).
pub fn rewrite_env(env: &mut [String], map: &PciAddressMap) -> Vec<String> {
    let mut warnings = Vec::new();
    if map.is_empty() {
        return warnings;
    }
    for entry in env.iter_mut() {
        let Some((key, value)) = entry.split_once('=') else { continue };
        if !key.starts_with("PCIDEVICE_") {
            continue;
        }
        let new = if key.ends_with("_INFO") {
            match serde_json::from_str::<serde_json::Value>(value) {
                Ok(mut json) => {
                    rewrite_json(&mut json, map);
                    json.to_string()
                }
                Err(e) => {
                    warnings.push(format!("{key}: not JSON ({e}), left unchanged"));
                    continue;
                }
            }
        } else {
            value
                .split(',')
                .map(|a| {
                    let a = a.trim();
                    guest_address(map, a).unwrap_or_else(|| {
                        warnings.push(format!("{key}: no guest address for host PCI address {a:?}, left unchanged"));
                        a.to_string()
                    })
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        *entry = format!("{key}={new}");
    }
    warnings
}

/// Replaces host addresses wherever they appear as object keys or string values.
fn rewrite_json(v: &mut serde_json::Value, map: &PciAddressMap) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(g) = guest_address(map, s) {
                *s = g;
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| rewrite_json(x, map)),
        serde_json::Value::Object(o) => {
            let old = std::mem::take(o);
            for (k, mut x) in old {
                rewrite_json(&mut x, map);
                let k = guest_address(map, &k).unwrap_or(k);
                o.insert(k, x);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_info_json_are_rewritten() {
        let map = address_map([("0000:3b:02.1".to_string(), "0000:00:05.0".to_string())].into()).unwrap();
        let mut env = vec![
            "PCIDEVICE_INTEL_COM_SRIOV=0000:3b:02.1,0000:3b:02.7".to_string(),
            r#"PCIDEVICE_INTEL_COM_SRIOV_INFO={"0000:3b:02.1":{"generic":{"deviceID":"0000:3b:02.1"}}}"#.to_string(),
            "OTHER=0000:3b:02.1".to_string(),
        ];
        let w = rewrite_env(&mut env, &map);
        assert_eq!(env[0], "PCIDEVICE_INTEL_COM_SRIOV=0000:00:05.0,0000:3b:02.7");
        assert_eq!(env[1], r#"PCIDEVICE_INTEL_COM_SRIOV_INFO={"0000:00:05.0":{"generic":{"deviceID":"0000:00:05.0"}}}"#);
        assert_eq!(env[2], "OTHER=0000:3b:02.1");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("0000:3b:02.7"));
    }

    #[test]
    fn a_malformed_or_oversized_map_is_refused_naming_the_entry() {
        let one = |k: &str, v: &str| address_map([(k.to_string(), v.to_string())].into()).unwrap_err().to_string();
        assert_eq!(
            one("0000:3b:02.1", "guest"),
            "pci_address_map value: invalid PCI address \"guest\": expected DDDD:BB:DD.F (hex), e.g. 0000:00:05.0"
        );
        assert!(one("0000:3b:40.1", "0000:00:05.0").starts_with("pci_address_map key: invalid PCI address \"0000:3b:40.1\""));
        let many: HashMap<String, String> =
            (0..=MAX_PCI_MAP).map(|i| (format!("0000:3b:{:02x}.{}", i / 8, i % 8), "0000:00:05.0".to_string())).collect();
        assert_eq!(many.len(), MAX_PCI_MAP + 1);
        assert_eq!(
            address_map(many).unwrap_err().to_string(),
            format!("pci_address_map: {} entries, at most {MAX_PCI_MAP}", MAX_PCI_MAP + 1)
        );
    }
}

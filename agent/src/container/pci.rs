//! `PCIDEVICE_*` env rewriting: the sriov-network-device-plugin puts the host's PCI
//! addresses of a pod's devices in the container env; inside the VM the same
//! devices sit at other addresses. The shim sends the map (host -> guest).

use std::collections::HashMap;

/// Rewrites `PCIDEVICE_<RESOURCE>=<addr>[,<addr>...]` and the
/// `PCIDEVICE_<RESOURCE>_INFO` JSON in `env` (as `KEY=VALUE` strings). Returns a
/// warning for each address not in the map (left unchanged).
pub fn rewrite_env(env: &mut [String], map: &HashMap<String, String>) -> Vec<String> {
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
                    map.get(a).cloned().unwrap_or_else(|| {
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
fn rewrite_json(v: &mut serde_json::Value, map: &HashMap<String, String>) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(g) = map.get(s.as_str()) {
                *s = g.clone();
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| rewrite_json(x, map)),
        serde_json::Value::Object(o) => {
            let old = std::mem::take(o);
            for (k, mut x) in old {
                rewrite_json(&mut x, map);
                let k = map.get(&k).cloned().unwrap_or(k);
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
        let map: HashMap<String, String> = [("0000:3b:02.1".to_string(), "0000:00:05.0".to_string())].into();
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
}

//! What a pod brings the shim: the runtime config file's text (an operator's, but a
//! parse must never panic), and the OCI spec containerd writes from the pod's
//! request: its annotations (Kata's VM size and SR-IOV keys, containerd's sandbox
//! resources), ids, mounts, processes. The input is the config text, a NUL byte,
//! then the spec's JSON.

#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vfvm_shim::bundle::Bundle;
use vfvm_shim::config::Config;
use vfvm_shim::sizing::PodResources;

/// The shipped config: what the annotations are applied to when the input's is not valid.
const SHIPPED: &str = include_str!("../../configs/vfvm.toml");

fuzz_target!(|data: &[u8]| {
    let (config_text, spec_bytes) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    let path = Path::new("/fuzz/vfvm.toml");
    let parsed = std::str::from_utf8(config_text).ok().and_then(|t| Config::parse(t, path).ok());
    let config = parsed.unwrap_or_else(|| Config::parse(SHIPPED, path).expect("the shipped config parses"));
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(spec_bytes) else { return };
    let annotations = spec
        .get("annotations")
        .and_then(|a| a.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let bundle = Bundle { dir: PathBuf::from("/nonexistent/vfvm-fuzz-bundle"), spec, annotations };
    let _ = config.sandbox_settings(&bundle.annotations);
    let _ = PodResources::from_annotations(&bundle.annotations);
    let _ = PodResources::describe(&bundle.annotations);
    if let Ok(id) = bundle.sandbox_id("fuzz-container") {
        // An id that passed is a single path component and a single word.
        assert!(!id.contains('/') && !id.contains(char::is_whitespace) && id != ".." && !id.is_empty(), "{id:?}");
        let _ = config.sandbox_dir(&id);
    }
    let _ = bundle.is_sandbox("fuzz-container");
    let _ = bundle.netns();
    let _ = bundle.hostname();
    let _ = bundle.guest_spec("/run/vfvm/files");
});

//! What the agent (in the untrusted guest) answers the shim: each reply the shim
//! decodes, from bytes as they come off the connection, and the bound on the words
//! it passes on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use vfvm_protocols::agent as api;

fn decode<M: Message>(data: &[u8]) {
    if let Ok(m) = M::parse_from_bytes(data) {
        // What decodes encodes again (the shim logs and forwards parts of it).
        m.write_to_bytes().expect("a decoded message encodes");
    }
}

fuzz_target!(|data: &[u8]| {
    decode::<api::GetEventResponse>(data);
    decode::<api::ReadStreamResponse>(data);
    decode::<api::ListProcessesResponse>(data);
    decode::<api::StatsContainerResponse>(data);
    decode::<api::HealthResponse>(data);
    decode::<api::GuestDetailsResponse>(data);
    let text = String::from_utf8_lossy(data);
    let bounded = vfvm_shim::sandbox::bounded_text(&text, 64);
    assert!(bounded.len() <= 64 + 32, "{} bytes", bounded.len());
});

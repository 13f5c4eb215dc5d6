//! What a host client sends the VMM's control API (length-prefixed JSON frames, each
//! answered whatever its bytes), and the address forms and hybrid vsock `CONNECT`
//! line the shim and the VMM parse.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vfvm_protocols::client::AgentAddress;
use vfvm_protocols::vmm_api::{answer_frame, read_frame, Response};

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    // A stream of frames, as one connection carries them (bounded like the server).
    for _ in 0..16 {
        match read_frame(&mut stream) {
            Ok(Some(frame)) => {
                let answer = answer_frame(&frame, &mut |_request| Response::Done);
                serde_json::to_vec(&answer).expect("every answer encodes");
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The whole input as one frame too, and as the text forms.
    let _ = answer_frame(data, &mut |_| Response::error(vfvm_protocols::vmm_api::ErrorCode::BadRequest, "fuzz"));
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = text.parse::<AgentAddress>() {
            // What parses prints back to the same address.
            assert_eq!(addr.to_string().parse::<AgentAddress>().ok(), Some(addr));
        }
    }
    let _ = vfvm_vmm::virtio::vsock::parse_connect_line(data);
});

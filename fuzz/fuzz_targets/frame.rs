//! The local socket's frames: a byte stream split into frames as the daemon
//! splits it, each decoded as a request (what the daemon reads) and as a
//! reply (what a client reads).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierckpt_proto::{read_frame, Request, WireResult};

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    while let Ok(Some(frame)) = read_frame(&mut r) {
        if let Ok(req) = serde_json::from_slice::<Request>(&frame) {
            // What decodes re-encodes and decodes to the same request.
            let again = serde_json::to_vec(&req).expect("a decoded request encodes");
            serde_json::from_slice::<Request>(&again).expect("an encoded request decodes");
        }
        let _ = serde_json::from_slice::<WireResult>(&frame);
    }
});

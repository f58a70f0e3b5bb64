//! The codec's blob as read back from the persistent tier: what it names
//! as its base ([`base_of`]), and a decode against the fixture's manifest
//! and base, which either fails or yields exactly the fixture's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierckpt_format::{base_of, decode_into};
use tierckpt_fuzz::pair;

fuzz_target!(|blob: &[u8]| {
    let p = pair();
    let _ = base_of(blob);
    let mut out = vec![0u8; p.data.len()];
    if decode_into(blob, &p.manifest, Some(&p.base), &mut out, "fuzz blob").is_ok() {
        assert!(out == p.data, "a blob decoded without error to other bytes");
    }
});

//! A manifest as read from a tier or a peer: either an error, or one whose
//! chunks cover its length, which round-trips through its JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierckpt_format::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json(data, "fuzz/manifest.json") {
        for i in 0..m.chunks.len() {
            let (start, end) = m.chunk_range(i);
            assert!(start < end && end <= m.file_len, "chunk {i} ({start}..{end}) outside the file");
        }
        let _ = m.check_len(m.file_len as usize);
        let back = Manifest::from_json(&m.to_json(), "fuzz/manifest.json").expect("a parsed manifest re-parses");
        assert_eq!(back, m);
    }
});

//! A shard file (safetensors) as the daemon parses every shard it is given:
//! either an error or a view whose every tensor lies inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierckpt_format::parse_shard;

fuzz_target!(|data: &[u8]| {
    if let Ok(view) = parse_shard(data, "fuzz.safetensors") {
        assert!(view.data_start as usize <= data.len());
        for e in &view.entries {
            let r = e.range();
            assert!(r.start >= view.data_start as usize && r.end <= data.len(), "{e:?} outside the file");
            let _ = &data[r];
        }
    }
});

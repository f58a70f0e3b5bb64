//! The parts of an HTTP request the daemon parses before any handler runs
//! that live outside the daemon crate: a `/v1/shards/{ns}/{step}/{rank}`
//! path's segments (namespace rules, numbers), a tensor name, and the JSON
//! bodies peers exchange (holdings, a member leaving, an error body).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierckpt_format::names::{validate_namespace, validate_rank, validate_tensor_name};
use tierckpt_proto::{Holdings, MemberSeen, WireError};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let mut parts = s.splitn(4, '/');
        let (ns, step, rank, world) = (parts.next(), parts.next(), parts.next(), parts.next());
        if let Some(ns) = ns {
            let _ = validate_namespace(ns);
            let _ = validate_tensor_name(ns);
        }
        let _ = step.map(str::parse::<u64>);
        if let (Some(Ok(rank)), Some(Ok(world))) = (rank.map(str::parse::<u32>), world.map(str::parse::<u32>)) {
            let _ = validate_rank(rank, world);
        }
    }
    let _ = serde_json::from_slice::<Holdings>(data);
    let _ = serde_json::from_slice::<MemberSeen>(data);
    let _ = serde_json::from_slice::<WireError>(data);
});

//! One name rule on every interface: a shard whose tensor name carries
//! control characters, refused by the Rust client, is refused over HTTP too,
//! and nothing of it is stored.

use tierckpt_harness::testing::{http, raw_shard, TestDaemon};

#[test]
fn http_put_of_a_tensor_name_with_an_escape_sequence_is_refused_and_stores_nothing() {
    let d = TestDaemon::start("64MiB");
    let a = d.proc.http_addr.clone().unwrap();
    let bearer = d.bearer();
    let auth = [("Authorization", bearer.as_str())];
    let (status, body) = http(&a, "PUT", "/v1/shards/names/1/0?world_size=1", &auth, &raw_shard("w\u{1b}[31m", &[]));
    let text = String::from_utf8_lossy(&body);
    assert!((400..500).contains(&status), "status {status}: {text}");
    // The error names the tensor, escaped (JSON escapes the raw byte too, so
    // look for the Rust escape in the decoded message).
    let msg = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["message"].as_str().unwrap().to_string();
    assert!(msg.contains(r#"tensor name "w\u{1b}[31m""#) && !msg.contains('\u{1b}'), "{msg}");
    let mut c = d.client();
    assert!(c.steps("names").unwrap_or_default().iter().all(|s| s.ranks.is_empty()), "nothing stored");
    assert_eq!(c.status().unwrap().memory.shards, 0);
    // The same shard with a printable name is stored.
    assert_eq!(http(&a, "PUT", "/v1/shards/names/2/0?world_size=1", &auth, &raw_shard("w.0", &[])).0, 201);
}

//! The Rust client against a real daemon process: round trips, crashes of
//! the client and of the daemon, corruption, capacity, racing writers.

use std::collections::BTreeMap;
use std::time::Duration;

use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{byte_len, Dtype, ShardKey};
use tierckpt_harness::testing::{shm_dir, writer_paused_at, TestDaemon};

const ALL_DTYPES: [Dtype; 22] = [
    Dtype::BOOL,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::C64,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
];

fn bytes_for(dtype: Dtype, shape: &[usize], seed: usize) -> Vec<u8> {
    let n = byte_len(dtype, shape).unwrap();
    (0..n).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 ^ seed as u8).collect()
}

#[test]
fn round_trip_every_dtype_empty_and_odd_sizes() {
    let d = TestDaemon::start("256MiB");
    let mut c = d.client();
    let mut owned = Vec::new();
    for (i, dt) in ALL_DTYPES.iter().enumerate() {
        // Shapes whose bit counts are whole bytes for 4- and 6-bit types too.
        for shape in [vec![0usize], vec![], vec![4, 3], vec![1001 * 8]] {
            if byte_len(*dt, &shape).is_err() {
                continue;
            }
            let name = format!("t{}_{dt}", owned.len());
            owned.push((name, *dt, shape.clone(), bytes_for(*dt, &shape, i)));
        }
    }
    // A large odd-sized tensor that spans several checksum chunks.
    owned.push(("big".into(), Dtype::U8, vec![(9 << 20) + 3], bytes_for(Dtype::U8, &[(9 << 20) + 3], 99)));
    let tensors: Vec<TensorData> =
        owned.iter().map(|(n, dt, s, b)| TensorData { name: n, dtype: *dt, shape: s, data: b }).collect();
    let meta = BTreeMap::from([("rng".to_string(), "[1,2,3]".to_string())]);
    let key = ShardKey::new("rt", 1, 0);
    c.save(&key, 1, &tensors, &meta, true).unwrap();
    assert_eq!(c.latest("rt").unwrap(), Some(1));

    let mut bufs: Vec<Vec<u8>> = owned.iter().map(|(_, _, _, b)| vec![0xEE; b.len()]).collect();
    let mut targets: Vec<(&str, &mut [u8])> =
        owned.iter().zip(bufs.iter_mut()).map(|(o, b)| (o.0.as_str(), &mut b[..])).collect();
    let (_, view) = c.load_into(&key, &mut targets).unwrap();
    assert_eq!(view.metadata, meta);
    for ((name, dt, shape, data), buf) in owned.iter().zip(&bufs) {
        assert!(data == buf, "{name} ({dt} {shape:?}) differs after load_into");
        let e = view.entry(name).unwrap();
        assert_eq!((&e.dtype, &e.shape), (dt, shape));
    }
    let mapped = c.open(&key).unwrap();
    for (name, _, _, data) in &owned {
        assert!(mapped.tensor(name).unwrap() == &data[..], "{name} differs in the mapping");
    }
    // The bytes are a valid safetensors file for the reference implementation.
    let st = safetensors::SafeTensors::deserialize(mapped.bytes()).unwrap();
    assert_eq!(st.len(), owned.len());
    assert_eq!(st.tensor("big").unwrap().data(), &owned.last().unwrap().3[..]);
}

#[test]
fn load_into_refuses_wrong_buffers_by_name() {
    let d = TestDaemon::start("64MiB");
    let mut c = d.client();
    let data = vec![1u8; 16];
    let t = [TensorData { name: "w", dtype: Dtype::F32, shape: &[4], data: &data }];
    let key = ShardKey::new("bad", 1, 0);
    c.save(&key, 1, &t, &BTreeMap::new(), true).unwrap();
    let mut small = [0u8; 8];
    let e = c.load_into(&key, &mut [("w", &mut small[..])]).unwrap_err();
    assert!(e.to_string().contains("\"w\"") && e.to_string().contains("16 bytes"), "{e}");
    let e = c.load_into(&key, &mut [("nope", &mut small[..])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = c.load_into(&ShardKey::new("bad", 2, 0), &mut []).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn client_killed_before_seal_leaves_nothing_and_daemon_serves_on() {
    let d = TestDaemon::start("64MiB");
    for (i, phase) in ["reserved", "half-written", "written"].iter().enumerate() {
        let mut w = writer_paused_at(&d.proc.socket, "crash", i as u64, 3 << 20, phase);
        w.kill().unwrap();
        w.wait().unwrap();
        let mut c = d.client();
        // The daemon reclaims the segment when the connection drops.
        let mut reclaimed = false;
        for _ in 0..200 {
            let u = c.status().unwrap().memory;
            if u.reservations == 0 && u.in_progress == 0 {
                reclaimed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reclaimed, "segment of the writer killed at {phase} was not reclaimed");
        let visible = c.steps("crash").unwrap().iter().any(|s| s.step == i as u64 && !s.ranks.is_empty());
        assert!(!visible, "a shard of the writer killed at {phase} is visible");
        // The key is free: a new writer of the same step succeeds.
        let mut again = writer_paused_at(&d.proc.socket, "crash", i as u64, 1000, "never");
        assert!(again.wait().unwrap().success());
    }
    assert_eq!(d.client().latest("crash").unwrap(), Some(2));
}

#[test]
fn client_killed_right_after_seal_still_publishes_a_verified_shard() {
    let d = TestDaemon::start("64MiB");
    let mut w = writer_paused_at(&d.proc.socket, "sealed", 5, 5 << 20, "sealed");
    w.kill().unwrap();
    w.wait().unwrap();
    let mut c = d.client();
    c.wait_visible(&ShardKey::new("sealed", 5, 0), Duration::from_secs(30)).unwrap();
    let s = c.open(&ShardKey::new("sealed", 5, 0)).unwrap();
    assert!(s.tensor("payload").unwrap() == &tierckpt_harness::writer::payload(5 << 20, 1)[..]);
}

#[test]
fn daemon_sigkill_and_restart_keeps_every_sealed_shard() {
    let mut d = TestDaemon::start("128MiB");
    let mut expected = Vec::new();
    {
        let mut c = d.client();
        for step in 1..=3u64 {
            for rank in 0..2u32 {
                let data = bytes_for(Dtype::U8, &[100_000 + step as usize], rank as usize);
                let t = [TensorData { name: "x", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
                c.save(&ShardKey::new("keep", step, rank), 2, &t, &BTreeMap::new(), false).unwrap();
                expected.push((step, rank, data));
            }
        }
        // Seals are acknowledged at once; the kill may land before some are
        // checksummed: the restarted daemon seals those itself.
    }
    d.proc.kill().unwrap();
    d.proc.restart().unwrap();
    let mut c = d.client();
    assert_eq!(c.latest("keep").unwrap(), Some(3));
    for (step, rank, data) in expected {
        let s = c.open(&ShardKey::new("keep", step, rank)).unwrap();
        assert!(s.tensor("x").unwrap() == &data[..], "step {step} rank {rank}");
    }
}

#[test]
fn flipped_byte_is_detected_on_load_and_by_verify() {
    let d = TestDaemon::start("64MiB");
    let mut c = d.client();
    let data = vec![7u8; 6 << 20];
    let t = [TensorData { name: "x", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    let key = ShardKey::new("flip", 1, 0);
    c.save(&key, 1, &t, &BTreeMap::new(), true).unwrap();
    let (path, _, _) = c.map_unverified(&key).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    assert_eq!(c.open(&key).err().map(|e| e.kind()), Some(ErrorKind::Corrupt));
    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["verify", "flip", "--json"]);
    assert!(!ok, "verify must fail on a corrupt shard");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["corrupt"], 1);
    // Over HTTP the corrupt shard is refused, not served.
    let auth = [("Authorization", d.bearer())];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _) = tierckpt_harness::testing::http(&d.http_addr(), "GET", "/v1/shards/flip/1/0", &auth, b"");
    assert_eq!(status, 422);

    // A load finds it, names the chunk, has the daemon drop the bad copy, and
    // finds no other tier to fall back to.
    let mut buf = vec![0u8; data.len()];
    let e = c.load_into(&key, &mut [("x", &mut buf[..])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let msg = e.to_string();
    assert!(msg.contains("chunk 1") && msg.contains("expected") && msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("no other copy"), "{msg}");
    assert!(c.steps("flip").unwrap().is_empty(), "the corrupt copy left memory");
}

#[test]
fn full_tier_gives_capacity_exceeded_and_keeps_what_it_must() {
    let d = TestDaemon::start("8MiB");
    let mut c = d.client();
    let data = vec![3u8; 3 << 20];
    let t = [TensorData { name: "x", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    c.save(&ShardKey::new("full", 1, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    c.save(&ShardKey::new("full", 2, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    // Step 3 fits by evicting step 1.
    c.save(&ShardKey::new("full", 3, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    let big = vec![0u8; 7 << 20];
    let tb = [TensorData { name: "x", dtype: Dtype::U8, shape: &[big.len()], data: &big }];
    let e = c.save(&ShardKey::new("full", 4, 0), 1, &tb, &BTreeMap::new(), true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded);
    assert!(e.to_string().contains("free"), "{e}");
    assert_eq!(c.latest("full").unwrap(), Some(3), "the newest complete step survives");
    let s = c.open(&ShardKey::new("full", 3, 0)).unwrap();
    assert!(s.tensor("x").unwrap() == &data[..]);
}

#[test]
fn concurrent_writer_processes_of_one_key_exactly_one_wins() {
    let d = TestDaemon::start("64MiB");
    let children: Vec<_> = (0..6)
        .map(|_| {
            std::process::Command::new(tierckpt_harness::daemon::binary("tierckpt-test-writer"))
                .arg("--socket")
                .arg(&d.proc.socket)
                .args(["--namespace", "race", "--step", "1", "--bytes", "100000"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let wins = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1, "exactly one writer wins");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("already"), "loser's error: {err}");
    }
}

#[test]
fn no_daemon_is_a_clear_error() {
    let dir = shm_dir();
    let e = Client::connect(dir.path().join("none.sock")).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.to_string().contains("none.sock"), "{e}");
}

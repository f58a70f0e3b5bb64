//! Tiers written by an earlier daemon are read by this one: stored fixtures
//! of format 1.0 (`tests/fixtures/v1`: a memory tier's `ns/` and a `file://`
//! persistent tier of zstd-compressed blobs, written by
//! `tierckpt-test-writer --bytes 65536 --seed <step>` for steps 1 and 2).
//! A later format version must keep passing these.

use std::path::Path;

use tierckpt_client::Client;
use tierckpt_format::ShardKey;
use tierckpt_harness::daemon::{DaemonOptions, DaemonProcess};
use tierckpt_harness::testing::shm_dir;
use tierckpt_harness::writer::payload;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1");
const BYTES: usize = 65536;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        match e.file_type().unwrap().is_dir() {
            true => copy_tree(&e.path(), &target),
            false => {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }
}

fn load(p: &DaemonProcess, step: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BYTES];
    let mut c = Client::connect(&p.socket).unwrap();
    c.load_into(&ShardKey::new("fixture", step, 0), &mut [("payload", &mut buf[..])])
        .unwrap_or_else(|e| panic!("step {step} of the fixture: {e}"));
    buf
}

fn daemon(dir: &Path, persistent: Option<&Path>) -> DaemonProcess {
    let mut o = DaemonOptions::new(dir.join("mem"));
    o.settings.memory_tier_size = Some("64MiB".into());
    if let Some(p) = persistent {
        o.set_flags(&["--persistent-path", &format!("file://{}", p.display())]).unwrap();
    }
    DaemonProcess::spawn(o).unwrap()
}

#[test]
fn a_memory_tier_of_format_1_0_is_read_bitwise() {
    let dir = shm_dir();
    copy_tree(&Path::new(FIXTURES).join("memory"), &dir.path().join("mem/ns"));
    let p = daemon(dir.path(), None);
    assert_eq!(Client::connect(&p.socket).unwrap().latest("fixture").unwrap(), Some(2));
    for step in [1, 2] {
        assert!(load(&p, step) == payload(BYTES, step as u8), "step {step} is bitwise");
    }
}

#[test]
fn a_persistent_tier_of_format_1_0_is_restored_bitwise() {
    let dir = shm_dir();
    let store = dir.path().join("store");
    copy_tree(&Path::new(FIXTURES).join("persistent"), &store);
    let p = daemon(dir.path(), Some(&store));
    assert_eq!(Client::connect(&p.socket).unwrap().latest("fixture").unwrap(), Some(2));
    // Each step is a zstd blob with its rank record and COMMIT: decoded and verified.
    for step in [2, 1] {
        assert!(load(&p, step) == payload(BYTES, step as u8), "step {step} is bitwise");
    }
}

//! Other local users: a symlink planted in the memory directory is never
//! followed, and clients talk only to a daemon of root or their own user.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tierckpt_client::{Client, ErrorKind};
use tierckpt_harness::testing::{cli, shm_dir, TestDaemon};
use tierckpt_proto::{FailureKind, FailureRecord};

#[test]
fn a_planted_symlink_in_the_failure_log_is_not_followed() {
    let d = TestDaemon::start("16MiB");
    let secret = d.dir.path().join("secret.txt");
    std::fs::write(&secret, "root only\n").unwrap();
    let failures = d.dir.path().join("mem/failures");
    std::fs::create_dir_all(&failures).unwrap();
    std::os::unix::fs::symlink(&secret, failures.join("evil.jsonl")).unwrap();
    let rec = FailureRecord { unix_ms: 1, kind: FailureKind::Start, detail: "x".into(), step: None, restart: 0 };
    let e = d.client().record_failure("evil", rec.clone()).unwrap_err();
    assert!(e.to_string().contains("evil.jsonl"), "{e}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n", "the symlink's target was written");
    // A namespace of its own is recorded as before.
    d.client().record_failure("good", rec).unwrap();
    assert_eq!(d.client().failures("good").unwrap().len(), 1);
}

#[test]
fn clients_refuse_a_socket_served_by_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to serve a socket as another user; CI runs as root");
        return;
    }
    let dir = shm_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("daemon.sock");
    // An impostor, running as nobody, listening where a daemon is expected;
    // it records whatever a client sends it.
    let got = dir.path().join("got");
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind({socket:?})\ns.listen(4)\nprint('ready',flush=True)\n\
         while True:\n  c,_=s.accept()\n  c.settimeout(2)\n  try:\n    b=c.recv(1<<16)\n  except Exception:\n    b=b''\n  \
         open({got:?},'ab').write(b)\n  c.close()\n",
        socket = socket.display().to_string(),
        got = got.display().to_string(),
    );
    let mut impostor = Command::new("python3")
        .args(["-c", &script])
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut ready = String::new();
    BufReader::new(impostor.stdout.as_mut().expect("stdout")).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let result = Client::connect(&socket);
    let (ok, _, stderr) = cli(&socket, &["status"]);
    // The impostor serves one connection at a time: once a probe's bytes are
    // recorded, whatever the refused clients sent was recorded before them.
    std::os::unix::net::UnixStream::connect(&socket).unwrap().write_all(b"probe").unwrap();
    let start = Instant::now();
    while !std::fs::read(&got).unwrap_or_default().ends_with(b"probe") {
        assert!(start.elapsed() < Duration::from_secs(20), "the impostor never recorded the probe");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&got).unwrap(), b"probe", "a request reached the impostor");
    let _ = impostor.kill();
    let _ = impostor.wait();
    let e = result.err().expect("the client refuses the impostor");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("uid 65534") && e.to_string().contains("nothing was sent"), "{e}");
    assert!(!ok && stderr.contains("uid 65534"), "tierckpt status: {stderr}");
}

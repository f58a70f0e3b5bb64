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

/// Runs `tierckpt-test-writer` as `uid` with `groups`, saving step 1 of
/// `ns`; its exit status and stderr.
fn write_as(socket: &std::path::Path, uid: u32, groups: &'static [u32], ns: &str) -> (bool, String) {
    let mut cmd = Command::new(tierckpt_harness::daemon::binary("tierckpt-test-writer"));
    cmd.args(["--socket", &socket.display().to_string(), "--namespace", ns, "--step", "1", "--bytes", "1048576"])
        .env("TIERCKPT_DAEMON_UID", "0")
        .current_dir("/");
    // SAFETY: setgroups, setgid and setuid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let ok =
                libc::setgroups(groups.len(), groups.as_ptr()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0;
            match ok {
                true => Ok(()),
                false => Err(std::io::Error::last_os_error()),
            }
        })
    };
    let out = cmd.output().expect("the writer runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_trainer_of_another_user_in_the_socket_group_saves_and_others_are_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to run a client as another user; CI runs as root");
        return;
    }
    const GROUP: u32 = 47_411;
    // The socket beside the memory tier and open to every user, so that the
    // daemon's own check (not the file's mode) has to refuse an outsider.
    let d = TestDaemon::start_with("64MiB", |o| {
        o.settings.socket = Some(o.memory_dir().with_file_name("daemon.sock"));
        o.set_flags(&["--socket-group", &GROUP.to_string(), "--socket-mode", "0666"]).unwrap()
    });
    // Other users may pass through the test's directory.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&d.proc.socket).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (GROUP, 0o666), "the socket's group and mode");

    let (ok, err) = write_as(&d.proc.socket, 47_412, &[GROUP], "team");
    assert!(ok, "a member of the socket group saves: {err}");
    assert_eq!(d.client().latest("team").unwrap(), Some(1));
    let shard = d.dir.path().join("mem/ns/team/00000000000000000001/rank-00000-of-00001.safetensors");
    let meta = std::fs::metadata(&shard).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (GROUP, 0o640), "a sealed shard is group-readable only");

    let (ok, err) = write_as(&d.proc.socket, 47_413, &[], "other");
    assert!(!ok && err.contains("socket_group"), "a user outside the group is refused, naming the setting: {err}");
    assert_eq!(d.client().latest("other").unwrap(), None);
}

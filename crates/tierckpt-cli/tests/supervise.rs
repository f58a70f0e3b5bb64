//! `tierckpt run`: restarts, their limit, hangs, signals, and the failure
//! record, with a real daemon and real child processes.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tierckpt_harness::testing::{shm_dir, tierckpt, TestDaemon};
use tierckpt_proto::{FailureKind, FailureRecord};

fn supervise(d: &TestDaemon, ns: &str, extra: &[&str], script: &str) -> Command {
    let mut c = tierckpt();
    c.arg("--socket")
        .arg(&d.proc.socket)
        .args(["run", "--namespace", ns, "--backoff", "10ms"])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    c
}

fn run(d: &TestDaemon, ns: &str, extra: &[&str], script: &str) -> Output {
    supervise(d, ns, extra, script).output().expect("tierckpt run runs")
}

fn records(d: &TestDaemon, ns: &str) -> Vec<FailureRecord> {
    d.client().failures(ns).expect("failures")
}

fn kinds(d: &TestDaemon, ns: &str) -> Vec<FailureKind> {
    records(d, ns).into_iter().map(|r| r.kind).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_for_file(p: &Path) -> String {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if let Ok(s) = std::fs::read_to_string(p) {
            if s.ends_with('\n') {
                return s;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} was not written", p.display());
}

#[test]
fn restarts_stop_at_the_limit_and_every_failure_is_recorded() {
    let d = TestDaemon::start("64MiB");
    let log = d.dir.path().join("runs");
    let o = run(&d, "limit", &["--max-restarts", "2"], &format!("echo $TIERCKPT_RESTART >> {}; exit 3", log.display()));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "0\n1\n2\n");
    let recs = records(&d, "limit");
    let k: Vec<_> = recs.iter().map(|r| r.kind).collect();
    assert_eq!(k, [FailureKind::Start, FailureKind::Exit, FailureKind::Exit, FailureKind::Exit]);
    assert_eq!(recs.iter().skip(1).map(|r| r.restart).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(recs[1].detail.contains("exit code 3"), "{:?}", recs[1]);
    assert!(stderr(&o).contains("giving up after 2 restart(s)"), "{}", stderr(&o));

    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["status"]);
    assert!(ok && out.contains("exit code 3") && out.contains("limit"), "{out}");
    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(ok);
    assert_eq!(v["failures"]["limit"].as_array().map(Vec::len), Some(4), "{v}");
}

#[test]
fn a_killed_command_is_restarted_with_the_job_environment() {
    let d = TestDaemon::start("64MiB");
    let out = d.dir.path().join("env");
    let script = format!(
        "if [ \"$TIERCKPT_RESTART\" = 0 ]; then kill -9 $$; fi; echo \"$TIERCKPT_NAMESPACE $TIERCKPT_SOCKET\" > {}",
        out.display()
    );
    let o = run(&d, "killed", &[], &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let env = std::fs::read_to_string(&out).unwrap();
    assert_eq!(env.trim(), format!("killed {}", d.proc.socket.display()));
    let recs = records(&d, "killed");
    assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>(), [FailureKind::Start, FailureKind::Signal]);
    assert_eq!(recs[1].detail, "SIGKILL");
}

#[test]
fn a_job_that_makes_progress_between_failures_keeps_running() {
    let d = TestDaemon::start("64MiB");
    let writer = tierckpt_harness::daemon::binary("tierckpt-test-writer");
    // Each run saves a new complete checkpoint, then fails, until run 4
    // succeeds: 4 failures, more than --max-restarts 1 allows in a row.
    let script = format!(
        "{} --socket \"$TIERCKPT_SOCKET\" --namespace progress --step $((TIERCKPT_RESTART + 1)) --bytes 4096 \
         > /dev/null || exit 9; [ \"$TIERCKPT_RESTART\" = 4 ] && exit 0; exit 5",
        writer.display()
    );
    let o = run(&d, "progress", &["--max-restarts", "1"], &script);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let recs = records(&d, "progress");
    assert_eq!(recs.iter().filter(|r| r.kind == FailureKind::Exit).count(), 4, "{recs:?}");
    assert_eq!(recs.last().unwrap().step, Some(4), "{recs:?}");
    assert!(stderr(&o).contains("start over"), "{}", stderr(&o));

    // Without a new checkpoint the same limit still stops a crash loop.
    let o = run(&d, "progress", &["--max-restarts", "1"], "exit 5");
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("giving up after 1 restart(s) without a new checkpoint"), "{}", stderr(&o));
}

#[test]
fn the_failure_record_names_the_newest_complete_step() {
    let d = TestDaemon::start("64MiB");
    let mut c = d.client();
    let data = vec![7u8; 64];
    let t = [tierckpt_client::TensorData { name: "w", dtype: tierckpt_format::Dtype::U8, shape: &[64], data: &data }];
    c.save(&tierckpt_format::ShardKey::new("stepped", 40, 0), 1, &t, &Default::default(), true).unwrap();
    let o = run(&d, "stepped", &["--max-restarts", "0"], "exit 1");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(records(&d, "stepped")[1].step, Some(40));
}

#[test]
fn a_hang_is_detected_and_its_processes_killed() {
    let d = TestDaemon::start("64MiB");
    let sleeper = d.dir.path().join("sleeper");
    let script = format!(
        "if [ \"$TIERCKPT_RESTART\" = 0 ]; then touch \"$TIERCKPT_HEARTBEAT_FILE\"; sleep 300 & echo $! > {}; wait; fi",
        sleeper.display()
    );
    let o = run(&d, "hang", &["--hang-timeout", "1s"], &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&d, "hang");
    assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>(), [FailureKind::Start, FailureKind::Hang]);
    assert!(recs[1].detail.contains("no heartbeat"), "{:?}", recs[1]);
    let pid: i32 = std::fs::read_to_string(&sleeper).unwrap().trim().parse().unwrap();
    let t = Instant::now();
    while !gone(pid) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone(pid), "the hung run's child {pid} survived");
}

#[test]
fn a_steady_heartbeat_is_not_a_hang() {
    let d = TestDaemon::start("64MiB");
    let script = "for i in $(seq 25); do touch \"$TIERCKPT_HEARTBEAT_FILE\"; sleep 0.1; done";
    let o = run(&d, "steady", &["--hang-timeout", "1s"], script);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(kinds(&d, "steady"), [FailureKind::Start]);
}

#[test]
fn exit_codes_and_signals_pass_through() {
    let d = TestDaemon::start("64MiB");
    let o = run(&d, "codes", &["--max-restarts", "0"], "exit 7");
    assert_eq!(o.status.code(), Some(7));
    let o = run(&d, "codes", &["--max-restarts", "0"], "kill -TERM $$");
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM));
    let k = kinds(&d, "codes");
    assert_eq!(k, [FailureKind::Start, FailureKind::Exit, FailureKind::Start, FailureKind::Signal]);
}

#[test]
fn ctrl_c_stops_the_command_without_a_restart() {
    let d = TestDaemon::start("64MiB");
    let pidfile = d.dir.path().join("pid");
    let script = format!("echo $$ > {}; sleep 300 & wait", pidfile.display());
    let mut sup = supervise(&d, "ctrlc", &[], &script).stderr(Stdio::piped()).spawn().unwrap();
    let pid: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sup.id() as i32, libc::SIGINT) };
    let status = sup.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(gone(pid), "the command survived Ctrl-C");
    assert_eq!(kinds(&d, "ctrlc"), [FailureKind::Start]);
}

#[test]
fn starts_a_daemon_when_none_answers() {
    let dir = shm_dir();
    let mem = dir.path().join("mem");
    let out = dir.path().join("socket");
    let o = tierckpt()
        .env_remove("TIERCKPT_SOCKET")
        .env("TIERCKPT_MEMORY_DIR", &mem)
        .env("TIERCKPT_MEMORY_TIER_SIZE", "64MiB")
        .env("TIERCKPT_HTTP_ADDR", "off")
        // As root the daemon would mount a tmpfs here, outliving the test's directory.
        .env("TIERCKPT_MOUNT_HUGE_TMPFS", "false")
        .args(["run", "--namespace", "fresh", "--", "sh", "-c"])
        .arg(format!("test -S \"$TIERCKPT_SOCKET\" && echo \"$TIERCKPT_SOCKET\" > {}", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let socket = mem.join("daemon.sock");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), socket.display().to_string());
    let mut c = tierckpt_client::Client::connect(&socket).expect("the started daemon answers after the job");
    let pid = c.status().unwrap().pid as i32;
    let k: Vec<_> = c.failures("fresh").unwrap().into_iter().map(|r| r.kind).collect();
    // SAFETY: the daemon this test caused to start.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(k, [FailureKind::Start]);
    let t = Instant::now();
    while !gone(pid) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let d = TestDaemon::start("64MiB");
    let o = tierckpt().arg("--socket").arg(&d.proc.socket).args(["run", "--namespace", "x"]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("CMD"), "{}", stderr(&o));
    let o = run(&d, "bad/ns", &[], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad/ns"), "{}", stderr(&o));
    let o = tierckpt()
        .arg("--socket")
        .arg(&d.proc.socket)
        .args(["run", "--namespace", "nocmd", "--", "/nonexistent/train"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot start \"/nonexistent/train\""), "{}", stderr(&o));
    let o = tierckpt()
        .arg("--socket")
        .arg(&d.proc.socket)
        .args(["run", "--hang-timeout", "soon", "--", "true"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--hang-timeout"), "{}", stderr(&o));
}

#[test]
fn ranks_get_the_launcher_environment() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    let script = format!(
        "echo \"$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $TIERCKPT_GENERATION \
         $TIERCKPT_RESTART_POLICY ${{TIERCKPT_GENERATION_FILE:+gf}}\" > {0}/env.$RANK; \
         test -n \"$MASTER_PORT\" && test -n \"$TIERCKPT_STORE_FILE\" && test \"$TIERCKPT_HEARTBEAT_FILE\" != \"\" \
         && echo \"$TIERCKPT_HEARTBEAT_FILE\" > {0}/beat.$RANK",
        dir.display()
    );
    let o = run(&d, "ranks", &["--nproc-per-node", "3"], &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let beats: std::collections::HashSet<String> =
        (0..3).map(|r| std::fs::read_to_string(dir.join(format!("beat.{r}"))).unwrap()).collect();
    assert_eq!(beats.len(), 3, "each rank has a heartbeat file of its own: {beats:?}");
    for r in 0..3 {
        let env = std::fs::read_to_string(dir.join(format!("env.{r}"))).unwrap();
        assert_eq!(env.trim(), format!("{r} {r} 3 3 127.0.0.1 0 all"), "rank {r}");
    }
}

/// A rank script for `--restart rank`: each start appends "generation pid"
/// to starts.$RANK; rank 1's first start fails at once, the others wait
/// for the launcher to announce generation 1 and exit 0.
fn restart_rank_script(dir: &Path) -> String {
    format!(
        "echo \"$TIERCKPT_GENERATION $$\" >> {0}/starts.$RANK; \
         if [ \"$RANK\" = 1 ] && [ \"$TIERCKPT_RESTART\" = 0 ]; then exit 7; fi; \
         i=0; while [ \"$(cat \"$TIERCKPT_GENERATION_FILE\" 2>/dev/null)\" != 1 ]; do \
           i=$((i+1)); [ $i -gt 600 ] && exit 8; sleep 0.05; done",
        dir.display()
    )
}

#[test]
fn restart_rank_starts_only_the_failed_rank_in_the_next_generation() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    let o = run(&d, "rankonly", &["--nproc-per-node", "3", "--restart", "rank"], &restart_rank_script(dir));
    assert!(o.status.success(), "{}", stderr(&o));
    let starts = |r: usize| -> Vec<String> {
        let s = std::fs::read_to_string(dir.join(format!("starts.{r}"))).unwrap();
        s.lines().map(|l| l.split(' ').next().unwrap().to_string()).collect()
    };
    assert_eq!(starts(0), ["0"], "rank 0 kept its process");
    assert_eq!(starts(2), ["0"], "rank 2 kept its process");
    assert_eq!(starts(1), ["0", "1"], "rank 1 started again, in generation 1");
    let recs = records(&d, "rankonly");
    assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>(), [FailureKind::Start, FailureKind::Exit]);
    assert_eq!(recs[1].detail, "rank 1: exit code 7");
    assert!(stderr(&o).contains("restarting rank 1 in 0ns"), "{}", stderr(&o));
}

#[test]
fn restart_all_stops_the_survivors_and_starts_every_rank() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    // The survivors would wait for a generation file that `--restart all` never writes: they must be killed.
    let o = run(
        &d,
        "rankall",
        &["--nproc-per-node", "3", "--restart", "all"],
        &restart_rank_script(dir).replace("i=0;", "[ \"$TIERCKPT_RESTART\" = 1 ] && exit 0; i=0;"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for r in 0..3 {
        let s = std::fs::read_to_string(dir.join(format!("starts.{r}"))).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2, "rank {r} started twice: {s}");
        assert!(lines[1].starts_with("1 "), "rank {r}'s second start is generation 1: {s}");
        let first_pid: i32 = lines[0].split(' ').nth(1).unwrap().parse().unwrap();
        assert!(gone(first_pid), "rank {r}'s first process was stopped");
    }
}

#[test]
fn bad_rank_arguments_are_named() {
    let d = TestDaemon::start("64MiB");
    let o = run(&d, "badranks", &["--nproc-per-node", "0"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--nproc-per-node"), "{}", stderr(&o));
    let o = run(&d, "badranks", &["--restart", "rank"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--nproc-per-node"), "{}", stderr(&o));
    let o = run(&d, "badranks", &["--nproc-per-node", "2", "--restart", "some"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("some"), "{}", stderr(&o));
}

#[test]
fn a_warm_spare_takes_over_a_failed_rank_and_is_replaced() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    // A spare notes its pid, waits for its rank, then runs as that rank. Every rank of generation 1 beats
    // its heartbeat, as a trainer does each step, until the launcher, seeing that progress, has started a
    // new spare.
    let script = format!(
        "if [ -n \"$TIERCKPT_SPARE_FILE\" ]; then echo $$ >> {0}/spares; \
           i=0; while [ ! -f \"$TIERCKPT_SPARE_FILE\" ]; do i=$((i+1)); [ $i -gt 600 ] && exit 8; sleep 0.02; done; \
           read RANK TIERCKPT_GENERATION < \"$TIERCKPT_SPARE_FILE\"; fi; \
         echo \"$TIERCKPT_GENERATION $$\" >> {0}/starts.$RANK; \
         if [ \"$RANK\" = 1 ] && [ \"$TIERCKPT_GENERATION\" = 0 ]; then exit 7; fi; \
         i=0; while [ \"$(cat \"$TIERCKPT_GENERATION_FILE\" 2>/dev/null)\" != 1 ]; do \
           i=$((i+1)); [ $i -gt 600 ] && exit 8; sleep 0.02; done; \
         i=0; while [ \"$(wc -l < {0}/spares)\" -lt 2 ]; do \
           touch \"$TIERCKPT_HEARTBEAT_FILE\"; i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.02; done",
        dir.display()
    );
    let o = run(&d, "spare", &["--nproc-per-node", "2", "--restart", "rank", "--spares", "1"], &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let spares: Vec<i32> =
        std::fs::read_to_string(dir.join("spares")).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(spares.len(), 2, "the spare taken was replaced: {}", stderr(&o));
    let starts1 = std::fs::read_to_string(dir.join("starts.1")).unwrap();
    let lines: Vec<&str> = starts1.lines().collect();
    assert_eq!(lines.len(), 2, "{starts1}");
    assert_eq!(lines[1], format!("1 {}", spares[0]), "the first spare became rank 1 of generation 1");
    assert_eq!(std::fs::read_to_string(dir.join("starts.0")).unwrap().lines().count(), 1, "rank 0 kept its process");
    assert!(
        stderr(&o).contains(&format!("spare pid {} takes over rank 1 (generation 1)", spares[0])),
        "{}",
        stderr(&o)
    );
    assert!(gone(spares[1]), "the spare left over was stopped with the job");
}

#[test]
fn a_spare_that_exits_stops_the_spares_not_the_job() {
    let d = TestDaemon::start("64MiB");
    let o = run(
        &d,
        "brokenspare",
        &["--nproc-per-node", "2", "--restart", "rank", "--spares", "1"],
        "[ -n \"$TIERCKPT_SPARE_FILE\" ] && exit 3; sleep 0.5",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("starting no more spares"), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("started spare").count(), 1, "{}", stderr(&o));
    let o = run(&d, "brokenspare", &["--nproc-per-node", "2", "--spares", "1"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--spares 1 needs --nproc-per-node and --restart rank"), "{}", stderr(&o));
}

#[test]
fn exit_75_is_a_preemption_passed_on_without_a_restart() {
    let d = TestDaemon::start("64MiB");
    let log = d.dir.path().join("runs");
    let o = run(&d, "preempt75", &["--max-restarts", "3"], &format!("echo run >> {}; exit 75", log.display()));
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "run\n", "not restarted");
    let recs = records(&d, "preempt75");
    assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>(), [FailureKind::Start, FailureKind::Preempted]);
    assert!(!recs[1].kind.is_failure());
    assert!(stderr(&o).contains("resumed later"), "{}", stderr(&o));
}

/// Ranks that checkpoint on `sig` (trap it, note it, exit 75) and print their pid first.
fn preemptible_ranks(dir: &Path, sig: &str) -> String {
    format!(
        "trap 'echo $TIERCKPT_RESTART > {0}/caught.$RANK; exit 75' {sig}; echo $$ > {0}/pid.$RANK; \
         while true; do sleep 0.02; done",
        dir.display()
    )
}

#[test]
fn a_preemption_signal_is_forwarded_and_ranks_that_checkpoint_make_the_job_preempted() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    for (ns, sig, signo) in [("preterm", "TERM", libc::SIGTERM), ("preusr1", "USR1", libc::SIGUSR1)] {
        let sup = supervise(&d, ns, &["--nproc-per-node", "2"], &preemptible_ranks(dir, sig))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_file(&dir.join("pid.0"));
        wait_for_file(&dir.join("pid.1"));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(sup.id() as i32, signo) };
        let out = sup.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{sig}: {err}");
        for r in 0..2 {
            assert_eq!(wait_for_file(&dir.join(format!("caught.{r}"))), "0\n", "{sig}: rank {r} checkpointed");
            std::fs::remove_file(dir.join(format!("caught.{r}"))).unwrap();
            std::fs::remove_file(dir.join(format!("pid.{r}"))).unwrap();
        }
        assert_eq!(kinds(&d, ns), [FailureKind::Start, FailureKind::Preempted], "{sig}");
        assert!(records(&d, ns)[1].detail.contains(&format!("SIG{sig}")), "{:?}", records(&d, ns));
    }
}

#[test]
fn ranks_that_ignore_a_preemption_signal_are_killed_after_the_grace() {
    let d = TestDaemon::start("64MiB");
    let dir = d.dir.path();
    let script = format!("trap '' TERM; echo $$ > {}/pid.$RANK; while true; do sleep 0.02; done", dir.display());
    let mut sup = supervise(&d, "ignored", &["--nproc-per-node", "2", "--grace", "300ms"], &script)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pids: Vec<i32> = (0..2).map(|r| wait_for_file(&dir.join(format!("pid.{r}"))).trim().parse().unwrap()).collect();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) };
    assert_eq!(sup.wait().unwrap().code(), Some(143), "not preempted: nobody checkpointed");
    assert!(pids.iter().all(|&p| gone(p)), "the ranks were killed after the grace");
    assert_eq!(kinds(&d, "ignored"), [FailureKind::Start]);
}

#[test]
fn an_unknown_preemption_signal_is_named() {
    let d = TestDaemon::start("64MiB");
    let o = run(&d, "badsig", &["--preemption-signals", "TERM,BOGUS"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown signal name \"BOGUS\""), "{}", stderr(&o));
    let o = run(&d, "badsig", &["--preemption-signals", "KILL"], "true");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be caught"), "{}", stderr(&o));
}

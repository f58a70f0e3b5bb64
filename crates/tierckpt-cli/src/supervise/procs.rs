//! The command's processes: how they ended, and stopping or killing each
//! one with everything it started.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The name of signal `sig`, as the failure record and the log spell it.
pub(crate) fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGALRM => "SIGALRM".into(),
        s => format!("signal {s}"),
    }
}

/// Exit code of the supervisor for the command's final status: its own code,
/// or 128 + the signal, as a shell reports it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}

/// SIGKILLs every process left in the group (workers of a dead launcher),
/// and every descendant of the command that left the group: torchrun
/// starts its workers in sessions of their own.
pub(crate) fn kill_group(pgid: i32) {
    let tree = descendants(pgid);
    // SAFETY: as above; an empty group gives ESRCH, which is fine.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    for pid in tree {
        // SAFETY: as above; a process gone meanwhile gives ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The processes below `root` now (children, their children, ...), from
/// the parent ids in /proc.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(i32, i32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

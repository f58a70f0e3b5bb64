//! Ctrl-C and SIGTERM (and the supervisor's preemption signals) as a flag
//! the long-running commands (the demo, the supervisor) poll, so that they
//! stop through their normal path: children killed or told, temporary
//! directories removed.

use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM set the flag instead of ending the process.
pub fn catch_int_term() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// From now on each of `sigs` sets the flag too.
pub fn catch(sigs: &[i32]) {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for &sig in sigs {
        // SAFETY: as above.
        unsafe { libc::signal(sig, handler) };
    }
}

/// The number of a signal named "SIGTERM", "TERM" or "term".
pub fn number(name: &str) -> Result<i32, String> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match short {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "QUIT" => libc::SIGQUIT,
        "ALRM" => libc::SIGALRM,
        "KILL" | "STOP" => return Err(format!("signal {name:?} cannot be caught")),
        _ => return Err(format!("unknown signal name {name:?} (e.g. TERM, USR1, USR2, HUP)")),
    })
}

/// The signal received, if any (0: none), left set.
pub fn received() -> i32 {
    RECEIVED.load(Ordering::SeqCst)
}

/// The signal received, if any (0: none), cleared.
pub fn take() -> i32 {
    RECEIVED.swap(0, Ordering::SeqCst)
}

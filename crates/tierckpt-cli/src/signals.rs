//! Ctrl-C and SIGTERM as a flag the long-running commands (the demo, the
//! supervisor) poll, so that they stop through their normal path: children
//! killed or told, temporary directories removed.

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

/// The signal received, if any (0: none), left set.
pub fn received() -> i32 {
    RECEIVED.load(Ordering::SeqCst)
}

/// The signal received, if any (0: none), cleared.
pub fn take() -> i32 {
    RECEIVED.swap(0, Ordering::SeqCst)
}

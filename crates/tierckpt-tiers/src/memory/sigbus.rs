//! A shard file truncated behind the daemon while it reads the file's
//! mapping (an operator's `truncate`, a tampering process) would end the
//! daemon with SIGBUS: a mapped page past the new end of the file has no
//! backing. With [`tolerate_truncated_files`] the fault is answered by a
//! page of zeros in place of the missing one, so the read goes on and the
//! reader's checksum verification refuses the shard with a clear error,
//! while the daemon keeps serving everything else.

use std::sync::atomic::{AtomicUsize, Ordering};

static PAGE: AtomicUsize = AtomicUsize::new(0);
static FAULTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let page = PAGE.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let mapped = code == libc::BUS_ADRERR && page != 0 && addr != 0 && {
        // SAFETY: maps an anonymous page over the faulting one (mmap is a plain
        // system call, safe in a handler); the file mapping's other pages stay.
        let p = unsafe {
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        p != libc::MAP_FAILED
    };
    if mapped {
        FAULTS.fetch_add(1, Ordering::Relaxed);
    } else {
        // Not a truncated file's page: the default action when the access is retried.
        // SAFETY: resetting a disposition is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

/// From now on a read of a mapped page past the end of its (truncated)
/// file reads zeros instead of ending the process. Idempotent.
pub fn tolerate_truncated_files() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    PAGE.store(usize::try_from(page).unwrap_or(4096), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; the handler only makes system calls and touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Pages of truncated files read as zeros so far (each one a shard that
/// its reader then refused).
pub fn truncated_pages_read() -> usize {
    FAULTS.load(Ordering::Relaxed)
}

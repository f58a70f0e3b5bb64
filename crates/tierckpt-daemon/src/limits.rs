//! Keeping the daemon answering when file descriptors run short: the
//! open-file limit raised at start, and what an accept loop does when
//! accepting fails (EMFILE and the like): it backs off instead of spinning,
//! and logs the first failure, then at most one line per
//! [`SUMMARY_EVERY`] with the count.

use std::time::{Duration, Instant};

/// Failures of one accept loop are logged at most this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Raises the soft limit on open files to the hard limit, and logs it;
/// returns the soft limit in force afterwards.
pub fn raise_open_file_limit() -> u64 {
    // SAFETY: getrlimit writes into a struct we own.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "reading the open-file limit failed");
        return crate::config::open_file_limit();
    }
    if r.rlim_cur >= r.rlim_max {
        tracing::info!(limit = r.rlim_cur, "open-file limit");
        return r.rlim_cur;
    }
    let before = r.rlim_cur;
    r.rlim_cur = r.rlim_max;
    // SAFETY: setrlimit reads a struct we own; raising the soft limit up to the hard one is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        tracing::warn!(from = before, to = r.rlim_max, error = %std::io::Error::last_os_error(),
            "raising the open-file limit failed");
        return before;
    }
    tracing::info!(from = before, to = r.rlim_max, "raised the open-file limit to its hard limit");
    r.rlim_max
}

/// The failures of one accept loop: how long to wait before the next
/// accept, and whether to log.
pub(crate) struct AcceptErrors {
    what: &'static str,
    backoff: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// For the accept loop of `what` ("the local socket", "the HTTP API").
    pub(crate) fn new(what: &'static str) -> Self {
        Self { what, backoff: FIRST_BACKOFF, last_logged: None, unlogged: 0 }
    }

    /// An accept succeeded: the next failure waits the shortest again.
    pub(crate) fn accepted(&mut self) {
        self.backoff = FIRST_BACKOFF;
    }

    /// An accept failed with `e`: logs it if due, and returns how long to
    /// wait before accepting again (10 ms, doubling to 1 s).
    pub(crate) fn failed(&mut self, e: &std::io::Error) -> Duration {
        let due = self.last_logged.is_none_or(|t| t.elapsed() >= SUMMARY_EVERY);
        if due {
            let what = self.what;
            match self.unlogged {
                0 => tracing::warn!(error = %e, "accepting a connection on {what} failed; backing off"),
                n => tracing::warn!(error = %e, "accepting a connection on {what} failed {} times in the last {:?}",
                    n + 1, SUMMARY_EVERY),
            }
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut a = AcceptErrors::new("a test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<Duration> = (0..10).map(|_| a.failed(&e)).collect();
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert_eq!(a.unlogged, 9, "only the first was logged");
        a.accepted();
        assert_eq!(a.failed(&e), FIRST_BACKOFF);
    }
}

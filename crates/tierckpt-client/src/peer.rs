//! Who is at the other end of the socket: the client sends nothing to a
//! process that is neither root nor the expected user, since anyone can bind
//! a socket where a daemon is expected (a world-writable `/dev/shm`, a
//! daemon that is down).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::{Error, Result};

/// Names the uid a daemon may run as besides root and this user.
pub const DAEMON_UID_ENV: &str = "TIERCKPT_DAEMON_UID";

/// The uid of the process that holds the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    // SAFETY: ucred is plain old data; zeroed is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the call; `cred` and `len` are ours
    // and `len` holds the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Refuses a socket whose server is not root, this user, or the uid in
/// [`DAEMON_UID_ENV`].
pub(crate) fn check_daemon(stream: &UnixStream, socket: &Path) -> Result<()> {
    let uid = peer_uid(stream).map_err(|e| Error::io(format!("asking who serves {}", socket.display()), e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let expected = std::env::var(DAEMON_UID_ENV).ok().and_then(|v| v.trim().parse::<u32>().ok());
    if uid == 0 || uid == me || Some(uid) == expected {
        return Ok(());
    }
    Err(Error::remote(
        tierckpt_proto::ErrorKind::Unauthorized,
        format!(
            "the process serving {} runs as uid {uid}, neither root nor this user (uid {me}): it may be an impostor; \
             nothing was sent. If the daemon runs as that user on purpose, set {DAEMON_UID_ENV}={uid}",
            socket.display()
        ),
    ))
}

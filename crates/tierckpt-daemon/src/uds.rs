//! The local API on a Unix socket: framed JSON requests (see
//! `tierckpt_proto`), peer credentials checked, reservations reclaimed
//! when their connection goes away.

use std::path::Path;
use std::sync::Arc;

use tierckpt_proto::{check_frame_len, frame, Request, WireResult};
use tierckpt_tiers::{ErrorKind, WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::limits::AcceptErrors;
use crate::{Daemon, DaemonError};

/// Binds the socket, replacing a stale file but never a live daemon's
/// socket, with `mode` and, when given, `group`.
pub(crate) fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, DaemonError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Config(format!(
                "a daemon is already serving {}; stop it or choose another socket",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| DaemonError::io(format!("creating {}", dir.display()), e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| DaemonError::io(format!("binding {}", path.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(|e| DaemonError::io(format!("giving {} to group {gid}", path.display()), e))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| DaemonError::io(format!("setting the mode of {}", path.display()), e))?;
    Ok(l)
}

pub(crate) async fn serve(d: Arc<Daemon>, listener: UnixListener, mut stop: watch::Receiver<bool>) {
    let mut errors = AcceptErrors::new("the local socket");
    loop {
        let wait = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => {
                    errors.accepted();
                    let d = d.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move { connection(d, s, stop).await });
                    continue;
                }
                Err(e) => errors.failed(&e),
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// This user, root, and members of the socket group (primary or
/// supplementary, as the kernel reports the peer's groups).
fn peer_allowed(s: &UnixStream, group: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let Ok(c) = s.peer_cred() else { return false };
    if c.uid() == me || c.uid() == 0 {
        return true;
    }
    match group {
        Some(g) => c.gid() == g || peer_groups(s).contains(&g),
        None => false,
    }
}

/// The peer's supplementary groups (SO_PEERGROUPS); empty if unknown.
fn peer_groups(s: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: the buffer holds `len` bytes; the kernel writes at most that and sets `len`.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// One frame, as [`tierckpt_proto::read_frame`] reads it (the same errors).
async fn read_frame(s: &mut UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match read_full(s, &mut len).await? {
        0 => return Ok(None),
        4 => {}
        n => return Err(frame::length_cut_short(n)),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_frame_len(len)?;
    let mut body = vec![0u8; len];
    let n = read_full(s, &mut body).await?;
    if n < len {
        return Err(frame::body_cut_short(n, len));
    }
    Ok(Some(body))
}

/// Reads until `buf` is full or the stream ends: the bytes read.
async fn read_full(s: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

async fn write_reply(s: &mut UnixStream, reply: &WireResult) -> std::io::Result<()> {
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(&body).await
}

async fn connection(d: Arc<Daemon>, mut s: UnixStream, mut stop: watch::Receiver<bool>) {
    if !peer_allowed(&s, d.cfg.socket_group) {
        let message = match d.cfg.socket_group {
            Some(g) => format!("this daemon serves only its own user, root and members of group {g} (socket_group)"),
            None => "this daemon serves only its own user and root (set socket_group to admit a group)".into(),
        };
        let refused = Err(WireError { kind: ErrorKind::Unauthorized, message });
        let _ = write_reply(&mut s, &refused).await;
        // Closing at once would fail the client's first write (EPIPE) before
        // it reads why: end our side, and take what it sends for a moment.
        let _ = s.shutdown().await;
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
        return;
    }
    let mut conn = crate::service::Connection::default();
    loop {
        let frame = tokio::select! {
            _ = stop.changed() => break,
            f = read_frame(&mut s) => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                let bad = Err(WireError { kind: ErrorKind::InvalidArgument, message: e.to_string() });
                let _ = write_reply(&mut s, &bad).await;
                break;
            }
        };
        let reply = match serde_json::from_slice::<Request>(&frame) {
            Ok(req) => d.handle(req, &mut conn).await,
            Err(e) => Err(WireError { kind: ErrorKind::InvalidArgument, message: format!("malformed request: {e}") }),
        };
        if write_reply(&mut s, &reply).await.is_err() {
            break;
        }
    }
    d.close(conn);
}

//! Verified copies into the memory tier from elsewhere (a peer, the
//! persistent tier): streamed, sparse against a base the node holds, or
//! decoded from a reduced blob. Every chunk is checked against the manifest
//! before it is written, and the copy is published only if all of it
//! matched; otherwise its segment is given back.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tierckpt_format::{Manifest, StreamVerifier};

use crate::{ErrorKind, MemoryTier, Reservation, ReservationGuard, TierError};

/// Reserves a segment for a copy of the shard `m` describes; None if an
/// identical copy is already held here.
fn reserve_for_copy(tier: &MemoryTier, m: &Manifest) -> Result<Option<Reservation>, TierError> {
    match tier.reserve(&m.key, m.world_size, m.file_len) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => match tier.locate(&m.key) {
            Ok((_, have)) if have.chunks == m.chunks => Ok(None),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// True when chunk `i` of `m` is unchanged in `base` (same length and
/// checksum): a sparse replica leaves it out, and the receiver copies it
/// from its own copy of the base.
pub fn unchanged_chunk(base: &Manifest, m: &Manifest, i: usize) -> bool {
    i < base.chunks.len()
        && base.chunk_size == m.chunk_size
        && base.chunk_range(i) == m.chunk_range(i)
        && base.chunks[i] == m.chunks[i]
}

/// The time a copy of `len` bytes gets unless its caller says otherwise:
/// 10 s, plus `len` at 1 MiB/s. A source slower than that holds memory for
/// nothing; past it the copy is dropped and its segment given back.
pub fn default_deadline(len: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs_f64(len as f64 / (1u64 << 20) as f64)
}

/// Streams a shard into the memory tier, verifying every chunk before it is
/// written; publishes it only if all of it matched `m`. With `base` (its
/// manifest and bytes), the stream is sparse: it carries only the chunks
/// that differ from the base, and the others are copied from it (verified
/// as well). Returns false if an identical copy was already held. A copy
/// not done within [`default_deadline`] is dropped.
pub async fn receive<S>(
    tier: &Arc<MemoryTier>,
    m: &Manifest,
    source: &str,
    stream: S,
    base: Option<(&Manifest, &[u8])>,
) -> Result<bool, TierError>
where
    S: Stream<Item = Result<Bytes, TierError>>,
{
    receive_within(tier, m, source, stream, base, default_deadline(m.file_len)).await
}

/// [`receive`], dropping the copy (its segment given back) unless it is
/// all received within `allowed`.
pub async fn receive_within<S>(
    tier: &Arc<MemoryTier>,
    m: &Manifest,
    source: &str,
    stream: S,
    base: Option<(&Manifest, &[u8])>,
    allowed: Duration,
) -> Result<bool, TierError>
where
    S: Stream<Item = Result<Bytes, TierError>>,
{
    let deadline = tokio::time::Instant::now() + allowed;
    let Some(r) = reserve_for_copy(tier, m)? else { return Ok(false) };
    // Given back on every way out but a seal, a dropped future included (a
    // connection that went away, a server stopping).
    let mut guard = ReservationGuard::new(tier, r.id);
    let result = async {
        let mut file = crate::private_fs::open_write(&r.path)
            .map_err(|e| TierError::io(format!("opening {}", r.path.display()), e))?;
        let mut v = StreamVerifier::new(m, format!("{} from {source}", m.key));
        let mut write = |bytes: &[u8]| -> Result<(), TierError> {
            v.feed(bytes)?;
            file.write_all(bytes).map_err(|e| TierError::io(format!("writing {}", r.path.display()), e))
        };
        // The next chunk and how much of it was written.
        let (mut chunk, mut in_chunk) = (0usize, 0u64);
        let copy_unchanged = |chunk: &mut usize, write: &mut dyn FnMut(&[u8]) -> Result<(), TierError>| {
            let Some((bm, bytes)) = base else { return Ok(()) };
            while *chunk < m.chunks.len() && unchanged_chunk(bm, m, *chunk) {
                let (a, b) = m.chunk_range(*chunk);
                write(&bytes[a as usize..b as usize])?;
                *chunk += 1;
            }
            Ok::<(), TierError>(())
        };
        copy_unchanged(&mut chunk, &mut write)?;
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next()).await.map_err(|_| {
                TierError::Unavailable(format!(
                    "{source} sent {} too slowly: a copy of {} bytes must arrive within {allowed:?}; dropped",
                    m.key, m.file_len
                ))
            })?;
            let Some(piece) = next else { break };
            let mut piece = &piece?[..];
            while !piece.is_empty() {
                if chunk >= m.chunks.len() {
                    return Err(TierError::InvalidArgument(format!(
                        "{source} sent more than the {} bytes of {}",
                        m.file_len, m.key
                    )));
                }
                let (a, b) = m.chunk_range(chunk);
                let take = ((b - a - in_chunk) as usize).min(piece.len());
                write(&piece[..take])?;
                (in_chunk, piece) = (in_chunk + take as u64, &piece[take..]);
                if in_chunk == b - a {
                    (chunk, in_chunk) = (chunk + 1, 0);
                    copy_unchanged(&mut chunk, &mut write)?;
                }
            }
        }
        v.finish()?;
        Ok::<(), TierError>(())
    }
    .await;
    result?;
    guard.disarm();
    let (tier, m) = (tier.clone(), m.clone());
    tokio::task::spawn_blocking(move || tier.seal_verified(r.id, &m))
        .await
        .map_err(|e| TierError::Unavailable(e.to_string()))??;
    Ok(true)
}

/// Like [`receive`], for a reduced blob (`tierckpt_format::encode`): decodes
/// it on `base` straight into the reserved segment, every chunk verified
/// against `m`, then publishes it. Blocking.
pub fn receive_decoded(
    tier: &MemoryTier,
    m: &Manifest,
    source: &str,
    blob: &[u8],
    base: Option<&[u8]>,
) -> Result<bool, TierError> {
    let Some(r) = reserve_for_copy(tier, m)? else { return Ok(false) };
    let decode = || -> Result<(), TierError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&r.path)
            .map_err(|e| TierError::io(format!("opening {}", r.path.display()), e))?;
        let label = format!("{} from {source}", m.key);
        if m.file_len == 0 {
            return Ok(tierckpt_format::decode_into(blob, m, base, &mut [], &label)?);
        }
        // SAFETY: a reserved segment is written by its reserver alone until sealed.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }
            .map_err(|e| TierError::io(format!("mapping {}", r.path.display()), e))?;
        Ok(tierckpt_format::decode_into(blob, m, base, &mut map[..], &label)?)
    };
    match decode() {
        Ok(()) => tier.seal_verified(r.id, m).map(|()| true),
        Err(e) => {
            let _ = tier.abort(r.id);
            Err(e)
        }
    }
}

/// Reads a whole stream into memory, verifying every chunk against `m`.
pub async fn collect_verified<S>(m: &Manifest, label: String, stream: S) -> Result<Vec<u8>, TierError>
where
    S: Stream<Item = Result<Bytes, TierError>>,
{
    let mut verifier = StreamVerifier::new(m, label);
    let mut out = Vec::with_capacity(m.file_len as usize);
    let mut stream = std::pin::pin!(stream);
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        verifier.feed(&piece)?;
        out.extend_from_slice(&piece);
    }
    verifier.finish()?;
    Ok(out)
}

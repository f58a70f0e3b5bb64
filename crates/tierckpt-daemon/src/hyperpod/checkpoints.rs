//! `/v1/cp/checkpoints/{namespace}/{rank}/{step}` (POST, GET, DELETE) and
//! `/v1/cp/checkpoints/{namespace}/latest`.
//!
//! A POST needs `Content-Length` (411 without; 413 above the memory tier's
//! capacity) and `Shard-Meta`; the body streams into a reservation while its
//! xxh3-128 is computed, and is sealed only if it is whole and matches: a
//! body cut short, too long or not matching stores nothing and leaves what
//! was stored as it was. A step is written once, as native steps are (409),
//! but the same bytes again (a retry whose answer was lost) are read,
//! checked and answered 200 with `already_stored`.
//! A DELETE deletes the whole step, on every node: a step without one of
//! its ranks can never be restored. `latest` lists complete steps only.

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;
use tierckpt_format::{parse_shard, verify_chunks, ShardKey};
use tierckpt_tiers::{ErrorKind, TierError};

use super::namespaces::{lookup, namespace, not_created};
use super::shard::{self, ShardMeta};
use super::{HpError, S};
use crate::Daemon;

/// Steps `latest` lists unless asked.
const DEFAULT_LIMIT: usize = 5;

/// The shard a path names, every part checked.
fn key(ns: &str, rank: &str, step: &str) -> Result<ShardKey, HpError> {
    let ns = namespace(ns)?;
    let rank: u32 =
        rank.parse().map_err(|_| HpError::bad(format!("rank {rank:?} is not a whole number below 2^32")))?;
    let step: u64 = step.parse().map_err(|_| HpError::bad(format!("step {step:?} is not a whole number")))?;
    Ok(ShardKey::new(ns, step, rank))
}

/// Stores a rank's body for a step.
pub(super) async fn put(
    State(d): S,
    UrlPath((ns, rank, step)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body_in: Body,
) -> Result<Json<serde_json::Value>, HpError> {
    let key = key(&ns, &rank, &step)?;
    let meta = ShardMeta::parse(headers.get("shard-meta")).map_err(HpError::bad)?;
    let c = lookup(&d, &key.namespace).await.ok_or_else(|| not_created(&key.namespace))?;
    if key.rank >= c.num_ranks {
        return Err(HpError::bad(format!(
            "rank {} is not below num_ranks {} of namespace {:?}",
            key.rank, c.num_ranks, key.namespace
        )));
    }
    let len = match headers.get(header::CONTENT_LENGTH) {
        None => {
            return Err(HpError::new(
                StatusCode::LENGTH_REQUIRED,
                ErrorKind::InvalidArgument,
                "Content-Length is required: the body's size is reserved before it is read",
            ))
        }
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| HpError::bad(format!("Content-Length {v:?} is not a whole number")))?,
    };
    if len > d.cfg.capacity {
        return Err(HpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::CapacityExceeded,
            format!(
                "a body of {len} bytes is larger than the memory tier ({} bytes, memory_tier_size)",
                d.cfg.capacity
            ),
        ));
    }
    d.check_client_step(&key.namespace, key.step)?;
    let layout = shard::layout(&meta, len)?;
    let allowed = d.cfg.upload_deadline(len);
    let body = BodyReader { key: &key, meta: &meta, len, allowed, deadline: tokio::time::Instant::now() + allowed };
    let r = match d.tier.reserve(&key, c.num_ranks, layout.file_len) {
        Ok(r) => r,
        // The same bytes again (a retry whose first answer was lost) are
        // stored already: read and check them, and say so.
        Err(e @ TierError::AlreadyExists(_)) if stored_meta(&d, &key).await.as_deref() == Some(&meta.to_json()) => {
            body.read(body_in.into_data_stream(), |_| Ok(())).await?;
            tracing::debug!(shard = %key, error = %e, "the same body again: already stored");
            return Ok(Json(json!({ "status": "ok", "already_stored": true })));
        }
        Err(e) => return Err(e.into()),
    };
    // Until sealed, any return gives the reservation back: nothing is stored.
    let mut guard = tierckpt_tiers::ReservationGuard::new(&d.tier, r.id);
    let mut file = tierckpt_tiers::private_fs::open_write(&r.path)
        .map_err(|e| TierError::io(format!("opening {}", r.path.display()), e))?;
    let write = |file: &mut std::fs::File, bytes: &[u8]| {
        std::io::Write::write_all(file, bytes).map_err(|e| TierError::io(format!("writing {}", r.path.display()), e))
    };
    write(&mut file, &layout.header)?;
    body.read(body_in.into_data_stream(), |piece| write(&mut file, piece)).await?;
    drop(file);
    guard.disarm();
    d.seal(r.id, true).await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// Why a body was not taken: its own fault, or a failure to store it.
enum Refused {
    Body(HpError),
    Stored(TierError),
}

impl From<Refused> for HpError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Body(h) => h,
            Refused::Stored(t) => t.into(),
        }
    }
}

/// What a body must be: `len` bytes within `allowed`, whose xxh3-128 is
/// the one `meta` gives.
struct BodyReader<'a> {
    key: &'a ShardKey,
    meta: &'a ShardMeta,
    len: u64,
    allowed: std::time::Duration,
    deadline: tokio::time::Instant,
}

impl BodyReader<'_> {
    /// Reads the body, handing each piece to `sink`, and checks it.
    async fn read(
        &self,
        mut stream: axum::body::BodyDataStream,
        mut sink: impl FnMut(&[u8]) -> Result<(), TierError>,
    ) -> Result<(), Refused> {
        let (key, len) = (self.key, self.len);
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        let mut written = 0u64;
        loop {
            let Ok(next) = tokio::time::timeout_at(self.deadline, stream.next()).await else {
                return Err(Refused::Body(HpError::bad(format!(
                    "upload of {key} too slow: {written} of {len} bytes in {:?} (upload_grace + size / \
                     min_upload_rate); nothing stored",
                    self.allowed
                ))));
            };
            let Some(piece) = next else { break };
            let piece = piece.map_err(|e| {
                Refused::Body(HpError::bad(format!(
                    "the body of {key} ended after {written} of {len} bytes ({e}); nothing stored"
                )))
            })?;
            written += piece.len() as u64;
            if written > len {
                return Err(Refused::Body(HpError::bad(format!(
                    "the body of {key} is longer than Content-Length {len}; nothing stored"
                ))));
            }
            hash.update(&piece);
            sink(&piece).map_err(Refused::Stored)?;
        }
        if written != len {
            return Err(Refused::Body(HpError::bad(format!(
                "the body of {key} ended after {written} of {len} bytes; nothing stored"
            ))));
        }
        let found = hash.digest128().to_be_bytes();
        if found != self.meta.checksum {
            return Err(Refused::Body(HpError::bad(format!(
                "the body of {key} does not match its Shard-Meta: xxh3_128 {} given, {} received; nothing stored",
                shard::b64(&self.meta.checksum),
                shard::b64(&found)
            ))));
        }
        Ok(())
    }
}

/// The `Shard-Meta` of the shard `key` held here, if it was written
/// through this API.
async fn stored_meta(d: &Daemon, key: &ShardKey) -> Option<String> {
    let (t, k) = (d.tier.clone(), key.clone());
    tokio::task::spawn_blocking(move || {
        let (_, bytes) = t.map_leased(&k).ok()?;
        let view = parse_shard(&bytes, &k.to_string()).ok()?;
        shard::body_of(&view).map(|(_, meta)| meta)
    })
    .await
    .ok()
    .flatten()
}

/// Serves a rank's body after verifying the whole shard against its
/// manifest, from whichever tier holds a verified copy.
pub(super) async fn get(
    State(d): S,
    UrlPath((ns, rank, step)): UrlPath<(String, String, String)>,
) -> Result<Response, HpError> {
    let key = key(&ns, &rank, &step)?;
    d.locate(&key).await?;
    let t = d.tier.clone();
    let k = key.clone();
    let (bytes, range, meta) = tokio::task::spawn_blocking(move || -> Result<_, TierError> {
        let (m, bytes) = t.map_leased(&k)?;
        verify_chunks(&bytes, &m, &k.to_string())?;
        let view = parse_shard(&bytes, &k.to_string())?;
        Ok((bytes, shard::body_of(&view)))
    })
    .await
    .map_err(|e| TierError::Unavailable(e.to_string()))?
    .map(|(bytes, found)| found.map(|(range, meta)| (bytes, range, meta)))?
    .ok_or_else(|| {
        HpError::new(
            StatusCode::CONFLICT,
            ErrorKind::InvalidArgument,
            format!("shard {key} was not written through the HyperPod API: read it with the native API"),
        )
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/octet-stream".parse().expect("static"));
    headers.insert("shard-meta", meta.parse().map_err(|_| HpError::bad("stored Shard-Meta is not a header value"))?);
    let body = Body::from(bytes::Bytes::from_owner(bytes).slice(range));
    Ok((headers, body).into_response())
}

/// Deletes the step the path names (all its ranks), on every node.
pub(super) async fn delete(
    State(d): S,
    UrlPath((ns, rank, step)): UrlPath<(String, String, String)>,
) -> Result<Json<serde_json::Value>, HpError> {
    let key = key(&ns, &rank, &step)?;
    let (shards, _) = d.delete(&key.namespace, Some(key.step), true).await?;
    Ok(Json(json!({ "status": "deleted", "deleted_shards": shards })))
}

/// The newest complete steps, newest first, at most `limit` (default 5).
pub(super) async fn latest(State(d): S, UrlPath(ns): UrlPath<String>, uri: Uri) -> Result<Json<Vec<u64>>, HpError> {
    let ns = namespace(&ns)?.to_string();
    let limit = match crate::http::query_param(&uri, "limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(HpError::bad(format!("limit {v:?} is not a whole number of at least 1"))),
        },
    };
    // The newest restorable step (this node, the cluster, the persistent
    // tier), then the older complete steps held here.
    let newest = d.latest(&ns).await?;
    let skip = d.unrestorable.of(&ns);
    let held = match d.tier.steps(&ns) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if newest.is_none() && held.is_empty() && d.hyperpod_namespaces.get(&ns).is_none() {
        return Err(HpError::not_found(format!("namespace {ns:?} has no steps and was not created here")));
    }
    let mut steps: Vec<u64> =
        held.iter().filter(|s| s.complete && !skip.contains(&s.step)).map(|s| s.step).chain(newest).collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    steps.truncate(limit);
    Ok(Json(steps))
}

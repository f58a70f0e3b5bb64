//! `/v1/cp/checkpoints/{namespace}/{rank}/{step}` (POST, GET, DELETE) and
//! `/v1/cp/checkpoints/{namespace}/latest`.
//!
//! A POST needs `Content-Length` (411 without; 413 above the memory tier's
//! capacity) and `Shard-Meta`; the body streams into a reservation while its
//! xxh3-128 is computed, and is sealed only if it is whole and matches: a
//! body cut short, too long or not matching stores nothing and leaves what
//! was stored as it was. A step is written once, as native steps are (409).
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

use super::namespaces::namespace;
use super::shard::{self, ShardMeta};
use super::{HpError, S};

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
    body: Body,
) -> Result<Json<serde_json::Value>, HpError> {
    let key = key(&ns, &rank, &step)?;
    let meta = ShardMeta::parse(headers.get("shard-meta")).map_err(HpError::bad)?;
    let c = super::namespaces::lookup(&d, &key.namespace).await.ok_or_else(|| {
        HpError::not_found(format!(
            "namespace {:?} not found: create it with POST /v1/cp/namespaces/{}?num_ranks=N",
            key.namespace, key.namespace
        ))
    })?;
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
    let deadline = tokio::time::Instant::now() + allowed;
    let r = d.tier.reserve(&key, c.num_ranks, layout.file_len)?;
    // Until sealed, any return gives the reservation back: nothing is stored.
    let mut guard = tierckpt_tiers::ReservationGuard::new(&d.tier, r.id);
    let mut file = tierckpt_tiers::private_fs::open_write(&r.path)
        .map_err(|e| TierError::io(format!("opening {}", r.path.display()), e))?;
    let write = |file: &mut std::fs::File, bytes: &[u8]| {
        std::io::Write::write_all(file, bytes).map_err(|e| TierError::io(format!("writing {}", r.path.display()), e))
    };
    write(&mut file, &layout.header)?;
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            return Err(HpError::bad(format!(
                "upload of {key} too slow: {written} of {len} bytes in {allowed:?} (upload_grace + size / \
                 min_upload_rate); nothing stored"
            )));
        };
        let Some(piece) = next else { break };
        let piece = piece.map_err(|e| {
            HpError::bad(format!("the body of {key} ended after {written} of {len} bytes ({e}); nothing stored"))
        })?;
        written += piece.len() as u64;
        if written > len {
            return Err(HpError::bad(format!("the body of {key} is longer than Content-Length {len}; nothing stored")));
        }
        hash.update(&piece);
        write(&mut file, &piece)?;
    }
    if written != len {
        return Err(HpError::bad(format!("the body of {key} ended after {written} of {len} bytes; nothing stored")));
    }
    let found = hash.digest128().to_be_bytes();
    if found != meta.checksum {
        return Err(HpError::bad(format!(
            "the body of {key} does not match its Shard-Meta: xxh3_128 {} given, {} received; nothing stored",
            shard::b64(&meta.checksum),
            shard::b64(&found)
        )));
    }
    drop(file);
    guard.disarm();
    d.seal(r.id, true).await?;
    Ok(Json(json!({ "status": "ok" })))
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

//! The HTTP API (axum on hyper): native `/v1` endpoints and `/health`. Shard
//! bodies stream in (no size limit beyond the memory tier's capacity) and are
//! served straight from the mapped segment after verification. It serves
//! only requests that carry a token of the role the endpoint needs
//! (`/health` aside; see `crate::auth`), over TLS when `tls_cert` is set, at most
//! `http_max_connections` connections at once, each closed when it sends no
//! complete request head for `http_idle_timeout`; an upload slower than
//! `min_upload_rate` is dropped.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tierckpt_format::{names, verify_chunks, ShardKey};
use tierckpt_tiers::{ErrorKind, TierError};
use tokio::sync::watch;

use crate::Daemon;

type D = State<Arc<Daemon>>;

/// A tier error as an HTTP response: a status from its kind, a JSON body.
struct ApiError(TierError);

impl<E: Into<TierError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

pub(crate) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists => StatusCode::CONFLICT,
        ErrorKind::Corrupt => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::CapacityExceeded => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Io | ErrorKind::Cancelled | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let w = self.0.to_wire();
        (status_of(w.kind), Json(w)).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(TierError::InvalidArgument(msg.into()))
}

fn parse_u64(what: &str, s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| bad(format!("{what} {s:?} is not a whole number")))
}

fn parse_u32(what: &str, s: &str) -> Result<u32, ApiError> {
    s.parse().map_err(|_| bad(format!("{what} {s:?} is not a whole number below 2^32")))
}

fn shard_key(ns: &str, step: &str, rank: &str) -> Result<ShardKey, ApiError> {
    names::validate_namespace(ns)?;
    Ok(ShardKey::new(ns, parse_u64("step", step)?, parse_u32("rank", rank)?))
}

pub(crate) fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

pub(crate) fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/status", get(status))
        .route("/v1/namespaces", get(namespaces))
        .route("/v1/namespaces/{ns}", axum::routing::delete(delete_namespace))
        .route("/v1/namespaces/{ns}/steps", get(steps))
        .route("/v1/namespaces/{ns}/latest", get(latest))
        .route("/v1/namespaces/{ns}/advice", get(advice))
        .route("/v1/namespaces/{ns}/pins", get(pins))
        .route("/v1/namespaces/{ns}/steps/{step}", axum::routing::delete(delete_step))
        .route("/v1/shards/{ns}/{step}/{rank}", get(get_shard).put(put_shard))
        .route("/v1/shards/{ns}/{step}/{rank}/manifest", get(get_manifest))
        .route("/v1/replicas/{ns}/{step}/{rank}", get(get_replica).put(put_replica))
        .route("/v1/peer/holdings", get(holdings))
        .route("/v1/peer/leave", axum::routing::post(peer_leave))
        .route("/v1/peer/pins/{ns}/{step}", axum::routing::post(peer_pin).delete(peer_unpin))
        .route("/v1/hyperpod/namespaces/{ns}", get(hyperpod_namespace).delete(forget_hyperpod_namespace))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError(TierError::NotFound(format!("no endpoint {}", uri.path()))) })
        .layer(middleware::from_fn_with_state(d.clone(), auth))
        .with_state(d)
}

/// Serves HTTP/1.1 on `listener` until `stop`, then waits for the open
/// connections to finish (idle ones close at once).
pub(crate) async fn serve(d: Arc<Daemon>, listener: tokio::net::TcpListener, stop: watch::Receiver<bool>) {
    let tls = d.tls.clone();
    serve_app(router(d.clone()), &d, "the HTTP API", listener, tls, stop).await
}

/// Serves `app` as [`serve`] does (`what` names the API in logs): the HTTP
/// API and the HyperPod API, under one cap on their connections together
/// and the same idle timeout; over TLS with `tls`.
pub(crate) async fn serve_app(
    app: Router,
    d: &Daemon,
    what: &'static str,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    // A connection holds a permit: past the cap, connections wait in the
    // kernel's backlog, and the descriptors stay for the local socket.
    let slots = d.http_slots.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's header timer also runs while a keep-alive connection waits
    // for its next request: one timeout covers slow heads and idle peers.
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(d.cfg.http_idle_timeout);
    // A client may end its sending side once its request is whole (`curl -T`
    // on some systems, `nc -N`): still answer it. Without this hyper drops
    // the connection at that EOF, so such an upload got no reply and was
    // sealed or not depending on timing.
    http.half_close(true);
    let mut errors = crate::limits::AcceptErrors::new(what);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = stop.changed() => break,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let wait = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, from)) => {
                    errors.accepted();
                    let (app, http, stop, tls) = (app.clone(), http.clone(), stop.clone(), tls.clone());
                    let handshake_within = d.cfg.http_idle_timeout;
                    conns.spawn(async move {
                        let _slot = slot;
                        let Some(tls) = tls else {
                            return serve_connection(tcp, app, &http, stop).await;
                        };
                        let Some(tls) = handshake(tcp, from, &tls, handshake_within).await else { return };
                        let verified = tls.get_ref().1.peer_certificates().is_some();
                        let app = app.layer(axum::Extension(crate::auth::ClientCert(verified)));
                        serve_connection(tls, app, &http, stop).await
                    });
                    while conns.try_join_next().is_some() {}
                    continue;
                }
                Err(e) => errors.failed(&e),
            }
        };
        drop(slot);
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Serves HTTP/1.1 on one connection until it ends or `stop`.
async fn serve_connection<I>(
    io: I,
    app: Router,
    http: &hyper::server::conn::http1::Builder,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(error = %e, "HTTP connection ended");
        },
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The TLS handshake of a new connection, within `within`. A client that
/// speaks plain HTTP gets a plain 400 saying to use https; a failed
/// handshake is logged (at debug: a misconfigured peer retries often).
async fn handshake(
    tcp: tokio::net::TcpStream,
    from: std::net::SocketAddr,
    tls: &crate::tls::Tls,
    within: std::time::Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let mut first = [0u8; 1];
    // A TLS connection opens with a handshake record (0x16).
    match tokio::time::timeout(within, tcp.peek(&mut first)).await {
        Ok(Ok(1..)) if first[0] != 0x16 => {
            let w = tierckpt_tiers::WireError {
                kind: ErrorKind::InvalidArgument,
                message: "this port serves HTTPS (tls_cert is set): use https://, with the cluster's CA (tls_ca) \
                          to verify it"
                    .into(),
            };
            let body = serde_json::to_string(&w).unwrap_or_default();
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let mut tcp = tcp;
            let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, resp.as_bytes()).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
            return None;
        }
        Ok(Ok(1..)) => {}
        _ => return None,
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server());
    match tokio::time::timeout(within, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(client = %from, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// Every request but `/health` carries `Authorization: Bearer <token>`, a
/// token of a role that may call the endpoint (401 for none or an unknown
/// one, 403 for the wrong role); under mutual TLS, the peer endpoints also
/// need the connection's client certificate.
async fn auth(State(d): D, req: Request, next: Next) -> Response {
    use crate::auth::Role;
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(has) = given.and_then(|g| crate::auth::role_of(&crate::auth::tokens(&d.cfg), g)) else {
        return ApiError(TierError::Remote {
            kind: ErrorKind::Unauthorized,
            message: "missing or wrong bearer token (Authorization: Bearer <a token of the daemon>)".into(),
        })
        .into_response();
    };
    let needed = crate::auth::needed(req.method(), req.uri().path(), req.uri().query());
    if !has.grants(needed) {
        return crate::auth::forbidden(format!(
            "{} {} needs the {} token; the given token is the {} token",
            req.method(),
            req.uri().path(),
            needed.describe(),
            has.describe()
        ));
    }
    let mutual = d.tls.as_ref().is_some_and(|t| t.mutual());
    let verified = req.extensions().get::<crate::auth::ClientCert>().is_some_and(|c| c.0);
    if needed == Role::Peer && mutual && !verified {
        return crate::auth::forbidden(format!(
            "{} is a peer endpoint: under mutual TLS it needs a client certificate signed by the cluster's CA \
             (tls_ca), and this connection presented none",
            req.uri().path()
        ));
    }
    next.run(req).await
}

async fn health(State(d): D) -> Json<serde_json::Value> {
    let u = d.tier.usage();
    Json(json!({ "status": "ok", "memory_used": u.used, "memory_capacity": u.capacity }))
}

async fn status(State(d): D) -> Json<serde_json::Value> {
    Json(serde_json::to_value(d.status()).unwrap_or_default())
}

async fn namespaces(State(d): D) -> Json<serde_json::Value> {
    Json(json!({ "namespaces": d.namespaces() }))
}

async fn steps(State(d): D, Path(ns): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "namespace": ns, "steps": d.tier.steps(&ns)? })))
}

async fn latest(State(d): D, Path(ns): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "namespace": ns, "step": d.latest(&ns).await? })))
}

async fn advice(State(d): D, Path(ns): Path<String>) -> Result<Json<tierckpt_proto::Advice>, ApiError> {
    Ok(Json(d.advice_for(&ns)?))
}

async fn pins(State(d): D, Path(ns): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "namespace": ns, "pins": d.list_pins(&ns).await? })))
}

async fn metrics(State(d): D) -> Response {
    let text = d.metrics.render();
    // What prometheus-client writes: OpenMetrics (counters' series end in
    // `_total`, the text ends with `# EOF`).
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// What this node holds and knows of the members (the heartbeat between
/// peers). A sender that names itself ([`crate::peer::MEMBER_HEADER`]) and
/// is not yet a member joins.
async fn holdings(State(d): D, headers: HeaderMap) -> Result<Json<tierckpt_proto::Holdings>, ApiError> {
    let Some(c) = d.cluster.as_ref() else { return Ok(Json(crate::cluster::holdings_of(&d.tier, ""))) };
    if let Some(v) = headers.get(crate::peer::MEMBER_HEADER) {
        c.heard_from(&parse_member(v.to_str().unwrap_or(""))?);
    }
    Ok(Json(c.holdings()))
}

/// "<id> <host:port> <incarnation>"; a 400 names what is wrong.
fn parse_member(v: &str) -> Result<tierckpt_proto::MemberSeen, ApiError> {
    let header = crate::peer::MEMBER_HEADER;
    let mut parts = v.split(' ');
    let (Some(id), Some(addr), Some(inc), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad(format!("{header} {v:?} is not \"<id> <host:port> <incarnation>\"")));
    };
    crate::membership::validate_node_id(id).map_err(|e| bad(format!("{header}: {e}")))?;
    crate::membership::parse_addr(addr).map_err(|e| bad(format!("{header}: address {e}")))?;
    let incarnation = parse_u64(&format!("{header} incarnation"), inc)?;
    Ok(tierckpt_proto::MemberSeen { id: id.into(), addr: addr.into(), incarnation, last_seen_unix_ms: None })
}

/// A peer leaves the cluster (it handed its copies over first).
async fn peer_leave(State(d): D, body: axum::body::Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(c) = d.cluster.as_ref() else {
        return Err(ApiError(TierError::InvalidArgument("this node is not in a cluster".into())));
    };
    let seen: tierckpt_proto::MemberSeen =
        serde_json::from_slice(&body).map_err(|e| bad(format!("a leave names the member as JSON: {e}")))?;
    crate::membership::validate_node_id(&seen.id).map_err(bad)?;
    c.left(&seen);
    Ok(Json(json!({ "left": seen.id })))
}

/// A member forwards a pin (`?name=` names the step): this node keeps its
/// copies of the step (see `crate::pins`).
async fn peer_pin(
    State(d): D,
    Path((ns, step)): Path<(String, String)>,
    uri: Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let step = parse_u64("step", &step)?;
    let (names, _) = d.pin_here(&ns, step, query_param(&uri, "name"))?;
    Ok(Json(json!({ "step": step, "names": names })))
}

/// A member forwards an unpin.
async fn peer_unpin(
    State(d): D,
    Path((ns, step)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let step = parse_u64("step", &step)?;
    Ok(Json(json!({ "step": step, "was_pinned": d.unpin_here(&ns, step)? })))
}

/// A namespace created here through the HyperPod API (for a peer that was
/// asked to store a rank of it).
async fn hyperpod_namespace(State(d): D, Path(ns): Path<String>) -> Result<Response, ApiError> {
    names::validate_namespace(&ns)?;
    match d.hyperpod_namespaces.get(&ns) {
        Some(c) => Ok(Json(c).into_response()),
        None => Err(ApiError(TierError::NotFound(format!("HyperPod namespace {ns} on this node")))),
    }
}

/// Forgets a HyperPod namespace here (deleted through a peer).
async fn forget_hyperpod_namespace(State(d): D, Path(ns): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    names::validate_namespace(&ns)?;
    Ok(Json(json!({ "forgotten": d.hyperpod_namespaces.remove(&ns) })))
}

/// A peer's copy of a shard, streamed with its manifest and unverified: the
/// receiver verifies every chunk.
async fn get_replica(
    State(d): D,
    Path((ns, step, rank)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = shard_key(&ns, &step, &rank)?;
    let t = d.tier.clone();
    let (m, bytes) = tokio::task::spawn_blocking(move || t.map_leased(&key))
        .await
        .map_err(|e| TierError::Unavailable(e.to_string()))??;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/octet-stream".parse().expect("static"));
    let manifest = serde_json::to_string(&m).expect("manifest serializes");
    headers.insert(
        crate::peer::MANIFEST_HEADER,
        manifest.parse().map_err(|_| bad("manifest is not a valid header value"))?,
    );
    Ok((headers, Body::from(bytes::Bytes::from_owner(bytes))).into_response())
}

/// Receives a replica from a peer; it becomes visible only if every chunk
/// matches the manifest sent with it.
async fn put_replica(
    State(d): D,
    Path((ns, step, rank)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = shard_key(&ns, &step, &rank)?;
    let raw = headers
        .get(crate::peer::MANIFEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("header {} is required", crate::peer::MANIFEST_HEADER)))?;
    let m = tierckpt_format::Manifest::from_json(raw.as_bytes(), "replica manifest")?;
    if m.key != key {
        return Err(bad(format!("manifest is for {}, the path names {key}", m.key)));
    }
    // A copy in flight when its step was deleted here must not bring it back.
    d.tier.refuse_deleted(&m)?;
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(|e| TierError::Unavailable(format!("reading the replica body: {e}"))));
    if headers.get(crate::peer::REDUCED_HEADER).is_some() {
        let stored = receive_reduced(&d, &m, stream).await?;
        return Ok((StatusCode::CREATED, Json(json!({ "stored": stored }))).into_response());
    }
    let base = match headers.get(crate::peer::SPARSE_BASE_HEADER) {
        None => None,
        Some(v) => {
            let b: tierckpt_format::BaseRef =
                v.to_str().ok().and_then(|v| serde_json::from_str(v).ok()).ok_or_else(|| {
                    bad(format!("header {} is not a base reference", crate::peer::SPARSE_BASE_HEADER))
                })?;
            Some(held_base(&d, &m, &b).await?)
        }
    };
    let base = base.as_ref().map(|(bm, map)| (bm, &map[..]));
    let allowed = d.cfg.upload_deadline(m.file_len);
    let stored = tierckpt_tiers::receive::receive_within(&d.tier, &m, "a peer", stream, base, allowed).await?;
    Ok((StatusCode::CREATED, Json(json!({ "stored": stored }))).into_response())
}

/// This node's copy of the delta base `b` of a replica of `m`, mapped under
/// a lease; `NotFound` when it does not hold that exact copy, so that the
/// sender sends the shard whole.
async fn held_base(
    d: &Daemon,
    m: &tierckpt_format::Manifest,
    b: &tierckpt_format::BaseRef,
) -> Result<(tierckpt_format::Manifest, tierckpt_tiers::LeasedMap), TierError> {
    let key = ShardKey::new(m.key.namespace.clone(), b.step, m.key.rank);
    let (t, k) = (d.tier.clone(), key.clone());
    let held = tokio::task::spawn_blocking(move || t.map_leased(&k))
        .await
        .map_err(|e| TierError::Unavailable(e.to_string()))?;
    match held {
        Ok((bm, map)) if b.matches(&bm) => Ok((bm, map)),
        Ok(_) => Err(TierError::NotFound(format!("the delta base {key} held here is another copy"))),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(TierError::NotFound(format!("the delta base {key} is not held here")))
        }
        Err(e) => Err(e),
    }
}

/// Reads a reduced replica (`REDUCED_HEADER`) and decodes it on this node's
/// copy of its base into memory, every chunk verified against `m`. A base
/// this node no longer holds is `NotFound`, and the sender sends the shard
/// whole. Returns false if an identical copy was already held.
async fn receive_reduced(
    d: &Daemon,
    m: &tierckpt_format::Manifest,
    stream: impl futures_util::Stream<Item = Result<bytes::Bytes, TierError>>,
) -> Result<bool, TierError> {
    let limit = m.file_len + (64 << 20);
    let allowed = d.cfg.upload_deadline(m.file_len);
    let deadline = tokio::time::Instant::now() + allowed;
    let mut blob = Vec::new();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await.map_err(|_| {
            TierError::Unavailable(format!(
                "a peer sent a reduced replica of {} too slowly: it must arrive within {allowed:?}; dropped",
                m.key
            ))
        })?;
        let Some(piece) = next else { break };
        let piece = piece?;
        if (blob.len() + piece.len()) as u64 > limit {
            return Err(TierError::InvalidArgument(format!(
                "a reduced replica of {} is larger than {limit} bytes",
                m.key
            )));
        }
        blob.extend_from_slice(&piece);
    }
    let base = match tierckpt_format::base_of(&blob)? {
        None => None,
        Some(b) => Some(held_base(d, m, &b).await?.1),
    };
    let (m, tier) = (m.clone(), d.tier.clone());
    tokio::task::spawn_blocking(move || {
        tierckpt_tiers::receive::receive_decoded(&tier, &m, "a peer", &blob, base.as_deref())
    })
    .await
    .map_err(|e| TierError::Unavailable(e.to_string()))?
}

/// Deletes across the cluster, or on this node alone with `?scope=node`.
async fn delete_namespace(State(d): D, Path(ns): Path<String>, uri: Uri) -> Result<Json<serde_json::Value>, ApiError> {
    let everywhere = query_param(&uri, "scope") != Some("node");
    let (shards, bytes) = d.delete(&ns, None, everywhere).await?;
    Ok(Json(json!({ "deleted_shards": shards, "deleted_bytes": bytes })))
}

async fn delete_step(
    State(d): D,
    Path((ns, step)): Path<(String, String)>,
    uri: Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let step = parse_u64("step", &step)?;
    let everywhere = query_param(&uri, "scope") != Some("node");
    let (shards, bytes) = d.delete(&ns, Some(step), everywhere).await?;
    Ok(Json(json!({ "deleted_shards": shards, "deleted_bytes": bytes })))
}

async fn get_manifest(
    State(d): D,
    Path((ns, step, rank)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = shard_key(&ns, &step, &rank)?;
    let (_, m) = d.locate(&key).await?;
    Ok(Json((*m).clone()).into_response())
}

/// Serves a shard's bytes after verifying them against its manifest.
async fn get_shard(State(d): D, Path((ns, step, rank)): Path<(String, String, String)>) -> Result<Response, ApiError> {
    let key = shard_key(&ns, &step, &rank)?;
    d.locate(&key).await?;
    let t = d.tier.clone();
    let (m, bytes) = tokio::task::spawn_blocking(move || -> Result<_, TierError> {
        let (m, bytes) = t.map_leased(&key)?;
        verify_chunks(&bytes, &m, &key.to_string())?;
        Ok((m, bytes))
    })
    .await
    .map_err(|e| TierError::Unavailable(e.to_string()))??;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/octet-stream".parse().expect("static"));
    headers.insert("x-tierckpt-world-size", m.world_size.into());
    let body = Body::from(bytes::Bytes::from_owner(bytes));
    Ok((headers, body).into_response())
}

/// Streams a shard (a whole safetensors file) into a reservation and seals
/// it. Needs `Content-Length` and `?world_size=N`.
async fn put_shard(
    State(d): D,
    Path((ns, step, rank)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = shard_key(&ns, &step, &rank)?;
    let world_size = parse_u32(
        "world_size",
        query_param(&uri, "world_size").ok_or_else(|| bad("query parameter world_size is required"))?,
    )?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad("Content-Length is required for a shard upload"))?;
    d.check_client_step(&key.namespace, key.step)?;
    let allowed = d.cfg.upload_deadline(len);
    let deadline = tokio::time::Instant::now() + allowed;
    let r = d.tier.reserve(&key, world_size, len)?;
    let mut guard = tierckpt_tiers::ReservationGuard::new(&d.tier, r.id);
    let mut file = tierckpt_tiers::private_fs::open_write(&r.path)
        .map_err(|e| TierError::io(format!("opening {}", r.path.display()), e))?;
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            tracing::warn!(shard = %key, written, len, "dropped an upload slower than min_upload_rate");
            return Err(bad(format!(
                "upload of {key} too slow: {written} of {len} bytes in {allowed:?}, the time an upload of {len} \
                 bytes gets (upload_grace + size / min_upload_rate); dropped, its space freed"
            )));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| bad(format!("reading the request body: {e}")))?;
        written += chunk.len() as u64;
        if written > len {
            return Err(bad(format!("body is longer than Content-Length {len}")));
        }
        std::io::Write::write_all(&mut file, &chunk)
            .map_err(|e| TierError::io(format!("writing {}", r.path.display()), e))?;
    }
    if written != len {
        return Err(bad(format!("body ended after {written} of {len} bytes")));
    }
    drop(file);
    guard.disarm();
    d.seal(r.id, true).await?;
    let (_, m) = d.tier.locate(&key)?;
    Ok((StatusCode::CREATED, Json((*m).clone())).into_response())
}

//! HTTP client for daemon-to-daemon traffic: heartbeats that carry each
//! node's holdings, pushing replicas, and fetching shards for a restore.
//! Every request carries the peer token; shard bodies are streamed and
//! verified chunk by chunk on the receiving side. With TLS (`tls_ca`) peers
//! are reached over https, their certificates verified against the cluster
//! CA, this node's certificate presented as the client's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use tierckpt_format::{BaseRef, Manifest, ShardKey};
use tierckpt_proto::Holdings;
use tierckpt_tiers::{TierError, WireError};

/// Header carrying a shard's manifest (compact JSON) with its bytes.
pub const MANIFEST_HEADER: &str = "x-tierckpt-manifest";
/// Present (value "1") when a replica's body is a reduced blob
/// (`tierckpt_format::encode`), not the shard bytes.
pub const REDUCED_HEADER: &str = "x-tierckpt-reduced";
/// Present on a sparse replica: the base (a `tierckpt_format::BaseRef` as
/// JSON) whose unchanged chunks the body leaves out. The body is the other
/// chunks back to back, in order; the receiver takes the rest from its copy
/// of the base (see `tierckpt_tiers::receive::unchanged_chunk`).
pub const SPARSE_BASE_HEADER: &str = "x-tierckpt-sparse-base";
/// Who sends a request between daemons: "<id> <host:port> <incarnation>"
/// (how a node that joins makes itself known).
pub const MEMBER_HEADER: &str = "x-tierckpt-member";

/// Pieces a shard body is cut into when streamed out.
const SEND_PIECE: usize = 4 << 20;

type Body = BoxBody<Bytes, std::io::Error>;

/// Client for the peer endpoints of other daemons.
#[derive(Clone)]
pub struct PeerClient {
    http: Arc<Mutex<Http>>,
    tls: Option<Arc<crate::tls::Tls>>,
    token: Option<String>,
    member: Option<String>,
}

/// The HTTP client, plain or over TLS; the TLS one is rebuilt when the
/// certificates are reloaded (its generation changes).
#[derive(Clone)]
enum Http {
    Plain(Client<HttpConnector, Body>),
    Tls { generation: u64, client: Client<HttpsConnector<HttpConnector>, Body> },
}

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    connector.enforce_http(false);
    connector
}

fn client<C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static>(c: C) -> Client<C, Body> {
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(c)
}

/// An https client on `config`, checking `server_name` on every peer's
/// certificate if given (else the host of the peer's address).
fn tls_client(config: rustls::ClientConfig, server_name: Option<&str>) -> Client<HttpsConnector<HttpConnector>, Body> {
    let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
    // Checked by the configuration: a name that does not parse is not set.
    let name = server_name.and_then(|n| rustls::pki_types::ServerName::try_from(n.to_string()).ok());
    let b = match name {
        Some(n) => b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n)),
        None => b,
    };
    client(b.enable_http1().wrap_connector(connector()))
}

/// Paces a stream to at most `bytes_per_s`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Bytes per second.
    pub bytes_per_s: u64,
}

/// `e` and its sources ("client error (SendRequest): ...: Broken pipe").
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn unavailable(addr: &str, what: &str, e: impl std::fmt::Display) -> TierError {
    TierError::Unavailable(format!("{what} at {addr}: {e}"))
}

/// What a failed TLS exchange with the peer at `addr` most likely means.
fn tls_hint(addr: &str, e: String) -> String {
    if e.contains("fatal alert") {
        format!(
            "{e} (peer {addr} refused this node's client certificate: is tls_cert signed by the peer's tls_ca \
             and still valid?)"
        )
    } else if e.contains("certificate") {
        format!("{e} (refused the certificate of peer {addr}: it must be signed by tls_ca, valid now, and carry the peer's name)")
    } else {
        e
    }
}

impl PeerClient {
    /// A client that sends `token` (the peer token) with every request,
    /// over https when `tls` has a client configuration (`tls_ca` is set).
    pub fn new(token: Option<String>, tls: Option<Arc<crate::tls::Tls>>) -> Self {
        let tls = tls.filter(|t| t.client().is_some());
        let http = match tls.as_ref().and_then(|t| t.client()) {
            None => Http::Plain(client(connector())),
            Some((generation, config)) => Http::Tls {
                generation,
                client: tls_client((*config).clone(), tls.as_ref().and_then(|t| t.server_name())),
            },
        };
        Self { http: Arc::new(Mutex::new(http)), tls, token, member: None }
    }

    /// The same client, naming this node in every request ([`MEMBER_HEADER`]).
    pub fn as_member(mut self, me: &tierckpt_proto::MemberSeen) -> Self {
        self.member = Some(format!("{} {} {}", me.id, me.addr, me.incarnation));
        self
    }

    /// The URL of `path` on the node at `addr`: the one place the scheme is chosen.
    fn url(&self, addr: &str, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}{path}")
    }

    /// Sends `req` with the current client, rebuilt first if the
    /// certificates were reloaded since it was made.
    fn request(&self, req: Request<Body>) -> ResponseFuture {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(tls), Http::Tls { generation, .. }) = (&self.tls, &*http) {
            if let Some((now, config)) = tls.client().filter(|(g, _)| g != generation) {
                *http = Http::Tls { generation: now, client: tls_client((*config).clone(), tls.server_name()) };
            }
        }
        match &*http {
            Http::Plain(c) => c.request(req),
            Http::Tls { client, .. } => client.request(req),
        }
    }

    async fn send(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, TierError> {
        let mut req = Request::builder().method(method).uri(self.url(addr, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(m) = &self.member {
            req = req.header(MEMBER_HEADER, m);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req =
            req.body(body).map_err(|e| TierError::InvalidArgument(format!("building a request to {addr}: {e}")))?;
        let fut = self.request(req);
        let resp = match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| unavailable(addr, path, format!("no answer within {t:?}")))?,
            None => fut.await,
        }
        .map_err(|e| unavailable(addr, path, tls_hint(addr, with_sources(&e))))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Err(match serde_json::from_slice::<WireError>(&body) {
            Ok(w) => TierError::Remote { kind: w.kind, message: format!("peer {addr}: {}", w.message) },
            Err(_) if status == StatusCode::UNAUTHORIZED => TierError::Remote {
                kind: tierckpt_tiers::ErrorKind::Unauthorized,
                message: format!("peer {addr} refused our token"),
            },
            Err(_) => unavailable(addr, path, format!("status {status}")),
        })
    }

    fn empty() -> Body {
        Empty::new().map_err(|never| match never {}).boxed()
    }

    /// The holdings of the node at `addr` (the heartbeat).
    pub async fn holdings(&self, addr: &str, timeout: Duration) -> Result<Holdings, TierError> {
        let deadline = Instant::now() + timeout;
        let resp = self.send(addr, Method::GET, "/v1/peer/holdings", &[], Self::empty(), Some(timeout)).await?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
        let body = tokio::time::timeout(left, resp.into_body().collect())
            .await
            .map_err(|_| unavailable(addr, "holdings", "body timed out"))?
            .map_err(|e| unavailable(addr, "holdings", e))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| unavailable(addr, "holdings", e))
    }

    /// Deletes a step (or a namespace) on the node at `addr` alone; returns
    /// (shards, bytes) deleted there, (0, 0) if it held none.
    pub async fn delete(&self, addr: &str, ns: &str, step: Option<u64>) -> Result<(u64, u64), TierError> {
        let path = match step {
            Some(s) => format!("/v1/namespaces/{ns}/steps/{s}?scope=node"),
            None => format!("/v1/namespaces/{ns}?scope=node"),
        };
        let resp = match self.send(addr, Method::DELETE, &path, &[], Self::empty(), Some(Duration::from_secs(30))).await
        {
            Ok(r) => r,
            Err(e) if e.kind() == tierckpt_tiers::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e),
        };
        let body = resp.into_body().collect().await.map_err(|e| unavailable(addr, &path, e))?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| unavailable(addr, &path, e))?;
        Ok((v["deleted_shards"].as_u64().unwrap_or(0), v["deleted_bytes"].as_u64().unwrap_or(0)))
    }

    /// A bodiless request to the node at `addr` and its JSON answer.
    pub async fn json(&self, addr: &str, method: Method, path: &str) -> Result<serde_json::Value, TierError> {
        let resp = self.send(addr, method, path, &[], Self::empty(), Some(Duration::from_secs(10))).await?;
        let body = resp.into_body().collect().await.map_err(|e| unavailable(addr, path, e))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| unavailable(addr, path, e))
    }

    /// Tells the node at `addr` that `who` leaves the cluster.
    pub async fn leave(&self, addr: &str, who: &tierckpt_proto::MemberSeen) -> Result<(), TierError> {
        let body = serde_json::to_vec(who).expect("a member serializes");
        let body = http_body_util::Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed();
        let headers = [("content-type", "application/json".to_string())];
        self.send(addr, Method::POST, "/v1/peer/leave", &headers, body, Some(Duration::from_secs(10))).await?;
        Ok(())
    }

    /// Streams a replica to a peer, which verifies it before it becomes
    /// visible.
    pub async fn put_replica(
        &self,
        addr: &str,
        manifest: &Manifest,
        body: &ReplicaBody,
        pace: Option<Pace>,
    ) -> Result<(), TierError> {
        let k = &manifest.key;
        let path = format!("/v1/replicas/{}/{}/{}", k.namespace, k.step, k.rank);
        let mut headers = vec![
            (MANIFEST_HEADER, serde_json::to_string(manifest).expect("manifest serializes")),
            ("content-length", body.wire_len().to_string()),
        ];
        let pieces = match body {
            ReplicaBody::Whole(d) => vec![d.clone()],
            ReplicaBody::Reduced { blob, .. } => {
                headers.push((REDUCED_HEADER, "1".to_string()));
                vec![blob.clone()]
            }
            ReplicaBody::Sparse { base, pieces } => {
                headers.push((SPARSE_BASE_HEADER, serde_json::to_string(base).expect("base serializes")));
                pieces.clone()
            }
        };
        let body = BodyExt::boxed(StreamBody::new(paced_pieces(pieces, pace).map(|b| Ok(Frame::data(b)))));
        self.send(addr, Method::PUT, &path, &headers, body, None).await?;
        Ok(())
    }

    /// Fetches a shard's manifest and a stream of its bytes (unverified: the
    /// caller verifies while receiving).
    pub async fn fetch(
        &self,
        addr: &str,
        key: &ShardKey,
    ) -> Result<(Manifest, impl Stream<Item = Result<Bytes, TierError>> + use<>), TierError> {
        let path = format!("/v1/replicas/{}/{}/{}", key.namespace, key.step, key.rank);
        let resp = self.send(addr, Method::GET, &path, &[], Self::empty(), Some(Duration::from_secs(10))).await?;
        let manifest = resp
            .headers()
            .get(MANIFEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unavailable(addr, &path, "no manifest header"))
            .and_then(|v| {
                Manifest::from_json(v.as_bytes(), &format!("manifest from {addr}")).map_err(TierError::from)
            })?;
        let stream = resp.into_body().into_data_stream().map({
            let addr = addr.to_string();
            move |r| r.map_err(|e| TierError::Unavailable(format!("receiving from {addr}: {e}")))
        });
        Ok((manifest, stream))
    }
}

/// What a replica's body carries.
#[derive(Debug, Clone)]
pub enum ReplicaBody {
    /// The shard's bytes.
    Whole(Bytes),
    /// A reduced blob (`tierckpt_format::encode`), and whether it refers to
    /// a base.
    Reduced {
        /// The blob.
        blob: Bytes,
        /// It holds chunks relative to a base the peer has.
        delta: bool,
    },
    /// The chunks that differ from `base`, in order (slices of the shard).
    Sparse {
        /// The step the peer holds whose unchanged chunks fill the gaps.
        base: BaseRef,
        /// The changed chunks.
        pieces: Vec<Bytes>,
    },
}

impl ReplicaBody {
    /// Bytes on the wire.
    pub fn wire_len(&self) -> u64 {
        match self {
            ReplicaBody::Whole(b) | ReplicaBody::Reduced { blob: b, .. } => b.len() as u64,
            ReplicaBody::Sparse { pieces, .. } => pieces.iter().map(|p| p.len() as u64).sum(),
        }
    }

    /// True when the peer needs a base to rebuild the shard.
    pub fn is_delta(&self) -> bool {
        match self {
            ReplicaBody::Whole(_) => false,
            ReplicaBody::Reduced { delta, .. } => *delta,
            ReplicaBody::Sparse { .. } => true,
        }
    }
}

/// Cuts `pieces` into pieces of at most [`SEND_PIECE`] bytes, pacing them if
/// asked.
fn paced_pieces(pieces: Vec<Bytes>, pace: Option<Pace>) -> impl Stream<Item = Bytes> {
    let start = Instant::now();
    let mut pieces = std::collections::VecDeque::from(pieces);
    pieces.retain(|p| !p.is_empty());
    futures_util::stream::unfold((pieces, 0u64), move |(mut rest, sent)| async move {
        let head = rest.front_mut()?;
        if let Some(p) = pace {
            let due = Duration::from_secs_f64(sent as f64 / p.bytes_per_s.max(1) as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        let piece = head.split_to(head.len().min(SEND_PIECE));
        if head.is_empty() {
            rest.pop_front();
        }
        let n = piece.len() as u64;
        Some((piece, (rest, sent + n)))
    })
}

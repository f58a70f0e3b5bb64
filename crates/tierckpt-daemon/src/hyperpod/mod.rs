//! The SageMaker HyperPod in-memory checkpoint API, so that the unchanged
//! `amzn-sagemaker-checkpointing` client (its DCP `SageMakerTieredStorageWriter`
//! and `SageMakerTieredStorageReader`) saves into and loads from this daemon.
//! It is served on an address of its own (`hyperpod_listen`, off by default)
//! and takes no token, since the client sends none: bind it to loopback.
//!
//! The mapping: a HyperPod namespace is a tierckpt namespace, and its
//! `num_ranks` (the DCP ranks plus the metadata "rank" the writer puts last)
//! is the world size of every step, so a step is complete, and `latest`
//! lists it, only once every rank, the metadata included, is there. A body
//! becomes a shard: a safetensors file of one U8 tensor holding the bytes,
//! with the `Shard-Meta` header in its metadata, reserved and sealed through
//! the daemon's own write path, so it is checksummed, replicated, drained,
//! kept or dropped by `keep_last`, and listed by `tierckpt ls`, as native
//! shards are. The body's xxh3-128 is checked against `Shard-Meta` as it
//! arrives; a GET verifies every chunk before it serves a byte.
//!
//! In a cluster, a node asked to store a rank of a namespace it has no
//! record of takes the record from a live peer that has one (the writer's
//! coordinator creates the namespace on its own node only), and deleting a
//! namespace makes every live peer forget it.
//!
//! One file per group of routes: `namespaces` (namespace settings, cluster
//! reset), `checkpoints` (shards, latest), and `shard` (the `Shard-Meta`
//! header and the shard layout).

mod checkpoints;
mod namespaces;
mod shard;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tierckpt_tiers::{ErrorKind, TierError};
use tokio::sync::watch;

use crate::Daemon;

pub(crate) use namespaces::Configs;

type S = State<Arc<Daemon>>;

/// An error answer: a status and a JSON body `{kind, message}`, as the
/// native HTTP API's, whose message names what was wrong.
pub(crate) struct HpError {
    status: StatusCode,
    kind: ErrorKind,
    message: String,
}

impl HpError {
    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into() }
    }

    /// 400: a bad path segment, query parameter, header or body.
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidArgument, message)
    }

    /// 404.
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }
}

impl<E: Into<TierError>> From<E> for HpError {
    fn from(e: E) -> Self {
        let w = e.into().to_wire();
        Self::new(crate::http::status_of(w.kind), w.kind, w.message)
    }
}

impl IntoResponse for HpError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "kind": self.kind, "message": self.message }))).into_response()
    }
}

fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/v1/cp/namespaces/{namespace}",
            get(namespaces::get).post(namespaces::create).delete(namespaces::delete),
        )
        .route("/v1/cp/cluster/reset", post(namespaces::reset))
        .route("/v1/cp/checkpoints/{namespace}/latest", get(checkpoints::latest))
        .route(
            "/v1/cp/checkpoints/{namespace}/{rank}/{step}",
            post(checkpoints::put).get(checkpoints::get).delete(checkpoints::delete),
        )
        .fallback(|uri: Uri| async move {
            HpError::not_found(format!(
                "no HyperPod endpoint {} (this address serves /v1/cp/... and /health)",
                uri.path()
            ))
        })
        .with_state(d)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "healthy" }))
}

/// Serves the HyperPod API on `listener` until `stop`, under the cap on
/// connections it shares with the HTTP API, with the same idle timeout.
pub(crate) async fn serve(d: Arc<Daemon>, listener: tokio::net::TcpListener, stop: watch::Receiver<bool>) {
    crate::http::serve_app(router(d.clone()), &d, "the HyperPod API", listener, None, stop).await
}

//! `/v1/cp/namespaces/{namespace}` (GET, POST, DELETE) and
//! `/v1/cp/cluster/reset`. Creating a namespace records its `num_ranks`, the
//! world size every step of it is written with; the records live in
//! `<memory dir>/hyperpod-namespaces.json`, so that they survive a restart of
//! the daemon as the memory tier does. Retention is the daemon's `keep_last`
//! for every namespace: the client's `steps_retained` is recorded and shown,
//! not obeyed. A reset deletes the namespaces created through this API, and
//! no other.

use std::collections::BTreeMap;
use std::path::Path;

use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, Uri};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tierckpt_format::names;
use tierckpt_tiers::private_fs::Access;
use tierckpt_tiers::ErrorKind;

use super::{HpError, S};
use crate::record::JsonRecord;
use crate::Daemon;

/// Steps the client asks to keep unless it says.
const DEFAULT_STEPS_RETAINED: u32 = 3;

/// What a POST recorded for a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NamespaceConfig {
    /// Ranks of every step: the DCP ranks and the metadata rank.
    pub(crate) num_ranks: u32,
    /// What the client asked to keep (the daemon keeps `keep_last`).
    pub(crate) steps_retained: u32,
}

/// The namespaces created here, kept in a file.
pub(crate) struct Configs {
    map: JsonRecord<BTreeMap<String, NamespaceConfig>>,
}

impl Configs {
    /// The records in `memory_dir`; a missing or unreadable file is none.
    pub(crate) fn open(memory_dir: &Path, access: Access) -> Self {
        Self { map: JsonRecord::open(memory_dir, "hyperpod-namespaces.json", access, "HyperPod namespaces") }
    }

    /// The record of `ns`.
    pub(crate) fn get(&self, ns: &str) -> Option<NamespaceConfig> {
        self.map.lock().get(ns).copied()
    }

    /// Every namespace recorded.
    pub(crate) fn names(&self) -> Vec<String> {
        self.map.lock().keys().cloned().collect()
    }

    /// Records `ns`, or returns the record it already has.
    pub(crate) fn create(&self, ns: &str, c: NamespaceConfig) -> Result<(), NamespaceConfig> {
        let mut map = self.map.lock();
        if let Some(old) = map.get(ns) {
            return Err(*old);
        }
        map.insert(ns.to_string(), c);
        self.map.save(&map);
        Ok(())
    }

    /// Forgets `ns`; true if it was recorded.
    pub(crate) fn remove(&self, ns: &str) -> bool {
        let mut map = self.map.lock();
        let had = map.remove(ns).is_some();
        if had {
            self.map.save(&map);
        }
        had
    }
}

/// The record of `ns`: this node's, else (in a cluster) the one a live peer
/// has, which is then recorded here too.
pub(super) async fn lookup(d: &Daemon, ns: &str) -> Option<NamespaceConfig> {
    if let Some(c) = d.hyperpod_namespaces.get(ns) {
        return Some(c);
    }
    let cluster = d.cluster.as_ref()?;
    let answers = cluster.ask_peers(Method::GET, &format!("/v1/hyperpod/namespaces/{ns}")).await;
    let c = answers.into_iter().find_map(|(_, r)| serde_json::from_value::<NamespaceConfig>(r.ok()?).ok())?;
    // A POST here meanwhile wins.
    Some(match d.hyperpod_namespaces.create(ns, c) {
        Ok(()) => c,
        Err(here) => here,
    })
}

/// Makes every live peer forget `ns` (deleted here); failures are logged.
async fn forget_on_peers(d: &Daemon, ns: &str) {
    let Some(cluster) = d.cluster.as_ref() else { return };
    for (node, r) in cluster.ask_peers(Method::DELETE, &format!("/v1/hyperpod/namespaces/{ns}")).await {
        if let Err(e) = r {
            tracing::warn!(node, namespace = ns, error = %e, "a peer may still hold the HyperPod namespace");
        }
    }
}

/// A namespace from the path, checked by the names rule.
pub(super) fn namespace(ns: &str) -> Result<&str, HpError> {
    names::validate_namespace(ns).map_err(|e| HpError::bad(e.to_string()))?;
    Ok(ns)
}

/// A whole number of at least 1 from the query, or `default` when absent.
fn count(uri: &Uri, name: &str, default: Option<u32>) -> Result<u32, HpError> {
    let Some(v) = crate::http::query_param(uri, name) else {
        return default.ok_or_else(|| HpError::bad(format!("query parameter {name} is required")));
    };
    match v.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(HpError::bad(format!("{name} {v:?} is not a whole number from 1 to {}", u32::MAX))),
    }
}

/// The 404 of a namespace not created (here or on a live peer).
pub(super) fn not_created(ns: &str) -> HpError {
    HpError::not_found(format!("namespace {ns:?} not found: create it with POST /v1/cp/namespaces/{ns}?num_ranks=N"))
}

pub(super) async fn get(State(d): S, UrlPath(ns): UrlPath<String>) -> Result<Json<serde_json::Value>, HpError> {
    let ns = namespace(&ns)?;
    let c = lookup(&d, ns).await.ok_or_else(|| not_created(ns))?;
    Ok(Json(json!({
        "num_ranks": c.num_ranks,
        "steps_to_retain_per_rank": d.cfg.keep_last,
        "steps_retained_requested": c.steps_retained,
    })))
}

pub(super) async fn create(
    State(d): S,
    UrlPath(ns): UrlPath<String>,
    uri: Uri,
) -> Result<Json<serde_json::Value>, HpError> {
    let ns = namespace(&ns)?;
    let num_ranks = count(&uri, "num_ranks", None)?;
    let steps_retained = count(&uri, "steps_retained", Some(DEFAULT_STEPS_RETAINED))?;
    d.hyperpod_namespaces.create(ns, NamespaceConfig { num_ranks, steps_retained }).map_err(|old| {
        HpError::new(
            axum::http::StatusCode::CONFLICT,
            ErrorKind::AlreadyExists,
            format!(
                "namespace {ns:?} already exists (num_ranks {}); delete it first to create it again",
                old.num_ranks
            ),
        )
    })?;
    Ok(Json(json!({ "status": "created" })))
}

/// Deletes a namespace: its record and its steps, on every node.
pub(super) async fn delete(State(d): S, UrlPath(ns): UrlPath<String>) -> Result<Json<serde_json::Value>, HpError> {
    let ns = namespace(&ns)?;
    let recorded = d.hyperpod_namespaces.remove(ns);
    forget_on_peers(&d, ns).await;
    let shards = match d.delete(ns, None, true).await {
        Ok((shards, _)) => shards,
        Err(e) if e.kind() == ErrorKind::NotFound && recorded => 0,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_created(ns)),
        Err(e) => return Err(e.into()),
    };
    Ok(Json(json!({ "status": "deleted", "deleted_shards": shards })))
}

/// Deletes every namespace created through this API, on every node.
pub(super) async fn reset(State(d): S) -> Result<Json<serde_json::Value>, HpError> {
    let mut deleted = Vec::new();
    for ns in d.hyperpod_namespaces.names() {
        d.hyperpod_namespaces.remove(&ns);
        forget_on_peers(&d, &ns).await;
        match d.delete(&ns, None, true).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        deleted.push(ns);
    }
    Ok(Json(json!({ "status": "reset", "namespaces": deleted })))
}

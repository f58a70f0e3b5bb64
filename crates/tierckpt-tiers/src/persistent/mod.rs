//! The persistent tier: checkpoints in a file system or an object store,
//! through the `object_store` crate (`file://`, `s3://`, `gs://`, `az://`).
//!
//! Layout under the URL's prefix:
//! ```text
//! <ns>/<step:020>/data/<writer>/rank-RRRRR-of-WWWWW.safetensors   shard bytes
//! <ns>/<step:020>/ranks/rank-RRRRR-of-WWWWW.json                   rank record (create-only)
//! <ns>/<step:020>/COMMIT                                           commit record (create-only)
//! <ns>/pins/<step:020>.json                                        a pinned step and its names
//! ```
//! With compression or delta (`PersistOptions::reduce`), the shard bytes are
//! stored as a reduced blob (`tierckpt_format::reduce`, `.tcz`): chunks
//! compressed, or referencing (or XORed against) the same rank's shard of an
//! earlier committed step, its *base*, named in the rank record. A chain of
//! deltas is at most `full_every` long; retention keeps every base a kept
//! step needs.
//!
//! A shard is uploaded to a path unique to its writer, then claimed by a rank
//! record written with create-only semantics: of two writers of one rank,
//! exactly one wins and the other deletes its upload. Once every rank has a
//! record, the COMMIT object, listing them, is written last, create-only. A
//! step exists for readers only through its COMMIT; objects it does not
//! reference are not part of the persistent state and are cleaned up, as are
//! the staging files of uploads a crash interrupted (`leftovers`).
//! Retention never deletes a pinned step (nor the delta bases it needs).

mod io;
mod leftovers;
mod read;
mod retention;
mod tier_impl;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tierckpt_format::names::validate_namespace;
use tierckpt_format::{self as reduce, BaseRef, ReduceOptions, ReduceStats};
use tierckpt_format::{verify_chunks, Manifest, ShardKey};

use crate::{now_unix_ms, ErrorKind, MemoryTier, Result, ShardBytes, StepSummary, Tier, TierError};

/// Shards are encoded only if expected to shrink below this share of their
/// size (`tierckpt_format::estimate`): storage is slow, so 5% pays already.
const PERSIST_ENCODE_BELOW: f64 = 0.95;

/// How uploads are made.
#[derive(Debug, Clone)]
pub struct PersistOptions {
    /// Shards at least this large go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Bytes per part of a multipart upload.
    pub part_size: usize,
    /// Parts in flight at once.
    pub concurrency: usize,
    /// Cap on upload bytes per second.
    pub bandwidth: Option<u64>,
    /// Attempts per request (or per multipart upload) on transient errors.
    pub attempts: u32,
    /// Compression, and whether to store deltas against a base.
    pub reduce: ReduceOptions,
    /// Every `full_every`-th shard of a rank is stored without a base (a
    /// chain of deltas is at most `full_every - 1` long).
    pub full_every: u32,
}

impl Default for PersistOptions {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 << 20,
            part_size: 16 << 20,
            concurrency: 4,
            bandwidth: None,
            attempts: 6,
            reduce: ReduceOptions::default(),
            full_every: 8,
        }
    }
}

/// The claim of one rank of a step: its manifest and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// The shard's manifest.
    pub manifest: Manifest,
    /// Object path of the shard bytes, relative to the tier's prefix.
    pub data: String,
    /// Present when `data` is a reduced blob rather than the shard bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduced: Option<ReducedRecord>,
}

/// How a rank's stored object encodes its shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReducedRecord {
    /// Bytes of the stored blob.
    pub stored_bytes: u64,
    /// The same rank's step the blob is a delta against.
    pub base_step: Option<u64>,
    /// Deltas between this shard and the nearest full one (0: full).
    pub chain: u32,
    /// What the encoder found (chunks same, XORed, compressed, raw).
    pub stats: ReduceStats,
}

impl RankRecord {
    /// Bytes this rank occupies in the store.
    pub fn stored_bytes(&self) -> u64 {
        self.reduced.as_ref().map_or(self.manifest.file_len, |r| r.stored_bytes)
    }
}

/// A shard given to [`PersistentTier::upload_with_base`] as the base of a
/// delta: its record in this tier and its bytes (from memory, identical to
/// what the record describes).
pub struct DeltaBase<'a> {
    /// Its record in this tier.
    pub record: &'a RankRecord,
    /// Its bytes.
    pub bytes: Bytes,
}

/// What one upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Uploaded {
    /// Bytes of the shard.
    pub raw_bytes: u64,
    /// Bytes stored for it.
    pub stored_bytes: u64,
    /// The step it is a delta against, if any.
    pub base_step: Option<u64>,
}

/// The commit point of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The shard format's version.
    pub format_version: String,
    /// The namespace.
    pub namespace: String,
    /// The step.
    pub step: u64,
    /// Ranks of the step.
    pub world_size: u32,
    /// When it was committed.
    pub committed_unix_ms: u64,
    /// Every rank's record.
    pub shards: Vec<RankRecord>,
}

/// A step as the persistent tier holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedStep {
    /// The step.
    pub step: u64,
    /// Ranks of the step.
    pub world_size: u32,
    /// Ranks with a record.
    pub ranks: Vec<u32>,
    /// A COMMIT exists.
    pub committed: bool,
}

/// A file system or object store holding committed checkpoints.
pub struct PersistentTier {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    /// For `file://`: the directory, so that uploads can be fsynced.
    local_root: Option<PathBuf>,
    writer: String,
    opts: PersistOptions,
}

impl std::fmt::Debug for PersistentTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentTier").field("url", &self.url).finish()
    }
}

fn store_err(url: &str, what: &str, e: object_store::Error) -> TierError {
    match e {
        object_store::Error::NotFound { .. } => TierError::NotFound(format!("{what} in {url}")),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            TierError::AlreadyExists(format!("{what} in {url}"))
        }
        e => {
            let msg = format!("{what} in {url}: {e}");
            let full = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
            if msg.contains("No space left") || full.contains("No space left") {
                TierError::StorageFull(msg)
            } else {
                TierError::Unavailable(msg)
            }
        }
    }
}

fn step_name(step: u64) -> String {
    format!("{step:020}")
}

fn rank_stem(rank: u32, world_size: u32) -> String {
    format!("rank-{rank:05}-of-{world_size:05}")
}

fn parse_rank_stem(s: &str) -> Option<(u32, u32)> {
    let (r, w) = s.strip_prefix("rank-")?.split_once("-of-")?;
    Some((r.parse().ok()?, w.parse().ok()?))
}

/// Applies `key=value` store options to a builder whose config keys parse from strings.
fn configure<B, K: std::str::FromStr>(
    mut b: B,
    options: &[(String, String)],
    store: &str,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B> {
    for (k, v) in options {
        let key = k.parse().map_err(|_| TierError::InvalidArgument(format!("unknown {store} option {k:?}")))?;
        b = set(b, key, v);
    }
    Ok(b)
}

/// Random hex for writer ids (from the std hasher's random keys).
pub fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    format!("{:016x}", std::collections::hash_map::RandomState::new().build_hasher().finish())
}

impl PersistentTier {
    /// Opens a tier by URL: `file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`. Cloud credentials,
    /// region and endpoint come from the environment as each SDK defines it
    /// (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP`, ...). `writer` names this writer in object paths.
    pub fn open(url: &str, writer: &str, opts: PersistOptions) -> Result<Self> {
        Self::open_with(url, writer, opts, &[])
    }

    /// Like [`Self::open`], with store options on top of the environment
    /// (for S3: `endpoint`, `allow_http`, `region`, `access_key_id`, ...,
    /// as `object_store` names them).
    pub fn open_with(url: &str, writer: &str, opts: PersistOptions, options: &[(String, String)]) -> Result<Self> {
        let bad = |m: String| TierError::InvalidArgument(m);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad(format!("persistent_path {url:?} is not a URL (file:///dir, s3://bucket/prefix, ...)"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let (store, prefix, local_root): (Arc<dyn ObjectStore>, &str, _) = match scheme {
            "file" => {
                if let Some((k, _)) = options.first() {
                    return Err(bad(format!("option {k:?} does not apply to file:// paths")));
                }
                let dir = PathBuf::from(rest);
                if !dir.is_absolute() {
                    return Err(bad(format!("file URL {url:?} needs an absolute path: file:///dir")));
                }
                std::fs::create_dir_all(&dir).map_err(|e| TierError::io(format!("creating {}", dir.display()), e))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| store_err(url, "opening", e))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), "", Some(dir))
            }
            "s3" | "s3a" => {
                let b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                let b = configure(b, options, "S3", |b, k, v| b.with_config(k, v))?;
                (Arc::new(b.build().map_err(|e| store_err(url, "configuring S3", e))?), prefix, None)
            }
            "gs" => {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
                let b = configure(b, options, "GCS", |b, k, v| b.with_config(k, v))?;
                (Arc::new(b.build().map_err(|e| store_err(url, "configuring GCS", e))?), prefix, None)
            }
            "az" | "azure" | "abfs" => {
                let b = object_store::azure::MicrosoftAzureBuilder::from_env().with_container_name(bucket);
                let b = configure(b, options, "Azure", |b, k, v| b.with_config(k, v))?;
                (Arc::new(b.build().map_err(|e| store_err(url, "configuring Azure", e))?), prefix, None)
            }
            other => {
                return Err(bad(format!("persistent_path scheme {other:?} is not supported: use file, s3, gs or az")))
            }
        };
        let mut tier = Self::with_store(store, prefix, url, writer, opts)?;
        tier.local_root = local_root;
        Ok(tier)
    }

    /// A tier over any store (for adapters such as fault injection).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
        writer: &str,
        opts: PersistOptions,
    ) -> Result<Self> {
        let prefix = ObjPath::parse(prefix.trim_matches('/'))
            .map_err(|e| TierError::InvalidArgument(format!("prefix of {url:?}: {e}")))?;
        Ok(Self {
            store,
            prefix,
            url: url.to_string(),
            local_root: None,
            writer: format!("{writer}-{}", random_hex()),
            opts,
        })
    }

    /// The tier's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store, to wrap it.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    pub(super) fn child(&self, parts: &[&str]) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.clone().join(*part);
        }
        p
    }

    pub(super) fn step_dir(&self, ns: &str, step: u64) -> ObjPath {
        self.child(&[ns, &step_name(step)])
    }

    pub(super) fn commit_path(&self, ns: &str, step: u64) -> ObjPath {
        self.child(&[ns, &step_name(step), "COMMIT"])
    }

    pub(super) fn record_path(&self, ns: &str, step: u64, rank: u32, world_size: u32) -> ObjPath {
        self.child(&[ns, &step_name(step), "ranks", &format!("{}.json", rank_stem(rank, world_size))])
    }
}

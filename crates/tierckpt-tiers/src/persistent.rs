//! The persistent tier: checkpoints in a file system or an object store,
//! through the `object_store` crate (`file://`, `s3://`, `gs://`, `az://`).
//!
//! Layout under the URL's prefix:
//! ```text
//! <ns>/<step:020>/data/<writer>/rank-RRRRR-of-WWWWW.safetensors   shard bytes
//! <ns>/<step:020>/ranks/rank-RRRRR-of-WWWWW.json                   rank record (create-only)
//! <ns>/<step:020>/COMMIT                                           commit record (create-only)
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
//! reference are not part of the persistent state and are cleaned up.

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
use tierckpt_format::{verify_chunks, Manifest, ShardKey, StreamVerifier};

use crate::{now_unix_ms, ErrorKind, MemoryTier, Result, ShardBytes, StepSummary, Tier, TierError};

/// Shards are encoded only if expected to shrink below this share of their
/// size (`tierckpt_format::estimate`): storage is slow, so 5% pays already.
const PERSIST_ENCODE_BELOW: f64 = 0.95;

/// How uploads are made.
#[derive(Debug, Clone)]
pub struct PersistOptions {
    /// Shards at least this large go up as multipart uploads.
    pub multipart_threshold: usize,
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
    pub record: &'a RankRecord,
    pub bytes: Bytes,
}

/// What one upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Uploaded {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub base_step: Option<u64>,
}

/// The commit point of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub format_version: String,
    pub namespace: String,
    pub step: u64,
    pub world_size: u32,
    pub committed_unix_ms: u64,
    pub shards: Vec<RankRecord>,
}

/// A step as the persistent tier holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedStep {
    pub step: u64,
    pub world_size: u32,
    pub ranks: Vec<u32>,
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

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store, to wrap it.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    fn child(&self, parts: &[&str]) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.clone().join(*part);
        }
        p
    }

    fn step_dir(&self, ns: &str, step: u64) -> ObjPath {
        self.child(&[ns, &step_name(step)])
    }

    fn commit_path(&self, ns: &str, step: u64) -> ObjPath {
        self.child(&[ns, &step_name(step), "COMMIT"])
    }

    fn record_path(&self, ns: &str, step: u64, rank: u32, world_size: u32) -> ObjPath {
        self.child(&[ns, &step_name(step), "ranks", &format!("{}.json", rank_stem(rank, world_size))])
    }

    /// Runs `op` with exponential backoff and jitter on transient errors.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < self.opts.attempts => {
                    tracing::debug!(what, attempt, error = %e, "retrying");
                    let jitter =
                        u64::from_str_radix(&random_hex()[..8], 16).unwrap_or(0) % (delay.as_millis() as u64 + 1);
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn put_small(&self, path: &ObjPath, bytes: Bytes, mode: PutMode, what: &str) -> Result<()> {
        self.retry(what, || {
            let opts = PutOptions { mode: mode.clone(), ..Default::default() };
            let (store, path, bytes) = (self.store.clone(), path.clone(), bytes.clone());
            async move {
                store
                    .put_opts(&path, PutPayload::from_bytes(bytes), opts)
                    .await
                    .map(|_| ())
                    .map_err(|e| store_err(&self.url, what, e))
            }
        })
        .await
    }

    async fn put_multipart(&self, path: &ObjPath, data: &Bytes, what: &str) -> Result<()> {
        self.retry(what, || async {
            let mut up = self.store.put_multipart(path).await.map_err(|e| store_err(&self.url, what, e))?;
            let start = Instant::now();
            let pace = self.opts.bandwidth;
            let part = self.opts.part_size;
            let parts: Vec<_> = (0..data.len().div_ceil(part))
                .map(|i| {
                    let piece = data.slice(i * part..((i + 1) * part).min(data.len()));
                    let fut = up.put_part(PutPayload::from_bytes(piece));
                    async move {
                        if let Some(bw) = pace {
                            let due = Duration::from_secs_f64((i * part) as f64 / bw.max(1) as f64);
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                tokio::time::sleep(wait).await;
                            }
                        }
                        fut.await
                    }
                })
                .collect();
            let sent: std::result::Result<Vec<()>, _> =
                futures_util::stream::iter(parts).buffer_unordered(self.opts.concurrency.max(1)).try_collect().await;
            let done = match sent {
                Ok(_) => up.complete().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                let _ = up.abort().await;
                return Err(store_err(&self.url, what, e));
            }
            Ok(())
        })
        .await
    }

    /// Makes a `file://` object durable: fsync the file and its directory.
    fn sync_local(&self, path: &ObjPath) -> Result<()> {
        let Some(root) = &self.local_root else { return Ok(()) };
        let file = root.join(path.as_ref());
        let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        sync(&file)
            .and_then(|()| sync(file.parent().unwrap_or(root)))
            .map_err(|e| TierError::io(format!("fsync of {}", file.display()), e))
    }

    /// Uploads one verified shard and claims its rank; `AlreadyExists` if
    /// another writer claimed it first (its upload wins, ours is deleted).
    pub async fn upload(&self, m: &Manifest, data: Bytes) -> Result<()> {
        self.upload_with_base(m, data, None).await.map(|_| ())
    }

    /// Like [`Self::upload`], compressed as `PersistOptions::reduce` says
    /// and, with delta and a `base` whose chain is short enough, as a delta
    /// against it.
    pub async fn upload_with_base(&self, m: &Manifest, data: Bytes, base: Option<DeltaBase<'_>>) -> Result<Uploaded> {
        let k = &m.key;
        let rpath = self.record_path(&k.namespace, k.step, k.rank, m.world_size);
        if self.exists(&rpath, "checking a rank record").await? {
            return Err(TierError::AlreadyExists(format!("shard {k} in {}", self.url)));
        }
        verify_chunks(&data, m, &format!("{k} before upload"))?;
        let opts = self.opts.reduce;
        let base = base.filter(|b| {
            opts.delta
                && b.record.manifest.key.namespace == k.namespace
                && b.record.manifest.key.rank == k.rank
                && b.record.manifest.key.step < k.step
                && b.record.reduced.as_ref().map_or(0, |r| r.chain) + 1 < self.opts.full_every
        });
        let reduced = if opts.compression == reduce::Compression::Off && base.is_none() {
            None
        } else {
            let chain = base.as_ref().map_or(0, |b| b.record.reduced.as_ref().map_or(0, |r| r.chain) + 1);
            let base_step = base.as_ref().map(|b| b.record.manifest.key.step);
            let base = base.map(|b| (b.bytes, b.record.manifest.clone()));
            let (m2, d2) = (m.clone(), data.clone());
            let encoded = tokio::task::spawn_blocking(move || {
                let base = base.as_ref().map(|(b, bm)| (&b[..], bm));
                // What would not shrink by 5% is not encoded at all.
                match reduce::estimate(&d2, &m2, base, &opts) < PERSIST_ENCODE_BELOW {
                    true => reduce::encode(&d2, &m2, base, &opts).map(Some),
                    false => Ok(None),
                }
            })
            .await
            .map_err(|e| TierError::Unavailable(format!("encoding worker failed: {e}")))??;
            // A blob that did not shrink is not stored: the shard is, as it is.
            encoded.filter(|(blob, _)| blob.len() < data.len()).map(|(blob, stats)| {
                let base_step = base_step.filter(|_| stats.same_chunks + stats.xor_chunks > 0);
                let chain = if base_step.is_some() { chain } else { 0 };
                (Bytes::from(blob), ReducedRecord { stored_bytes: stats.encoded_bytes, base_step, chain, stats })
            })
        };
        match reduced {
            Some((blob, r)) => self.store_shard(m, blob, Some(r), rpath).await,
            None => self.store_shard(m, data, None, rpath).await,
        }
    }

    /// Uploads `body` (the shard, or its blob described by `reduced`) and
    /// claims the rank with a create-only record at `rpath`.
    async fn store_shard(
        &self,
        m: &Manifest,
        body: Bytes,
        reduced: Option<ReducedRecord>,
        rpath: ObjPath,
    ) -> Result<Uploaded> {
        let k = &m.key;
        // Unique per upload, so no upload ever overwrites a claimed one.
        let ext = if reduced.is_some() { "tcz" } else { "safetensors" };
        let data_path = self.child(&[
            &k.namespace,
            &step_name(k.step),
            "data",
            &format!("{}-{}", self.writer, &random_hex()[..8]),
            &format!("{}.{ext}", rank_stem(k.rank, m.world_size)),
        ]);
        let uploaded = Uploaded {
            raw_bytes: m.file_len,
            stored_bytes: body.len() as u64,
            base_step: reduced.as_ref().and_then(|r| r.base_step),
        };
        let what = format!("shard {k}");
        if body.len() >= self.opts.multipart_threshold {
            self.put_multipart(&data_path, &body, &what).await?;
        } else {
            self.put_small(&data_path, body, PutMode::Overwrite, &what).await?;
        }
        self.sync_local(&data_path)?;
        let record = RankRecord { manifest: m.clone(), data: data_path.as_ref().to_string(), reduced };
        let body = Bytes::from(serde_json::to_vec(&record).expect("record serializes"));
        match self.put_small(&rpath, body, PutMode::Create, &format!("rank record of {k}")).await {
            Ok(()) => self.sync_local(&rpath).map(|()| uploaded),
            Err(e) => {
                let _ = self.remove(&data_path).await;
                Err(e)
            }
        }
    }

    async fn exists(&self, path: &ObjPath, what: &str) -> Result<bool> {
        self.retry(what, || async {
            match self.store.head(path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(store_err(&self.url, what, e)),
            }
        })
        .await
    }

    async fn remove(&self, path: &ObjPath) -> Result<()> {
        let what = format!("deleting {path}");
        self.retry(&what, || async {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(store_err(&self.url, &what, e)),
            }
        })
        .await
    }

    async fn list_all(&self, prefix: &ObjPath) -> Result<Vec<ObjPath>> {
        self.retry("listing", || async {
            self.store
                .list(Some(prefix))
                .map_ok(|m| m.location)
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| store_err(&self.url, &format!("listing {prefix}"), e))
        })
        .await
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(&self, path: &ObjPath, what: &str) -> Result<T> {
        let bytes = self
            .retry(what, || async {
                let r = self.store.get(path).await.map_err(|e| store_err(&self.url, what, e))?;
                r.bytes().await.map_err(|e| store_err(&self.url, what, e))
            })
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            TierError::Corrupt(tierckpt_format::FormatError::InvalidManifest {
                file: format!("{}/{path}", self.url),
                reason: e.to_string(),
            })
        })
    }

    /// Writes the COMMIT of a step once every rank has a record. Returns true
    /// if the step is committed (by this call or before).
    pub async fn try_commit(&self, ns: &str, step: u64, world_size: u32) -> Result<bool> {
        let cpath = self.commit_path(ns, step);
        if self.exists(&cpath, "checking a commit").await? {
            return Ok(true);
        }
        let records = self.list_all(&self.child(&[ns, &step_name(step), "ranks"])).await?;
        let mut shards = Vec::new();
        for p in &records {
            let Some((rank, w)) = p.filename().and_then(|f| f.strip_suffix(".json")).and_then(parse_rank_stem) else {
                continue;
            };
            if w != world_size {
                return Err(TierError::InvalidArgument(format!(
                    "{ns}/step {step} has a rank record for world_size {w}, not {world_size}"
                )));
            }
            let r: RankRecord = self.read_json(p, &format!("rank record {rank} of {ns}/step {step}")).await?;
            shards.push(r);
        }
        shards.sort_by_key(|r| r.manifest.key.rank);
        if shards.len() != world_size as usize {
            return Ok(false);
        }
        let record = CommitRecord {
            format_version: tierckpt_format::FORMAT_VERSION.to_string(),
            namespace: ns.to_string(),
            step,
            world_size,
            committed_unix_ms: now_unix_ms(),
            shards,
        };
        let body = Bytes::from(serde_json::to_vec_pretty(&record).expect("commit serializes"));
        match self.put_small(&cpath, body, PutMode::Create, &format!("commit of {ns}/step {step}")).await {
            Ok(()) => {
                self.sync_local(&cpath)?;
                tracing::info!(namespace = ns, step, url = %self.url, "step committed");
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(e),
        }
    }

    pub async fn commit_record(&self, ns: &str, step: u64) -> Result<CommitRecord> {
        self.read_json(&self.commit_path(ns, step), &format!("commit of {ns}/step {step}")).await
    }

    /// Every step of a namespace with its rank records and commit state.
    pub async fn steps(&self, ns: &str) -> Result<Vec<PersistedStep>> {
        validate_namespace(ns)?;
        let mut out: std::collections::BTreeMap<u64, PersistedStep> = Default::default();
        let ns_dir = self.child(&[ns]);
        for p in self.list_all(&ns_dir).await? {
            let parts: Vec<_> =
                p.prefix_match(&ns_dir).map(|i| i.map(|x| x.as_ref().to_string()).collect()).unwrap_or_default();
            let Some(step) = parts.first().and_then(|s| s.parse::<u64>().ok()) else { continue };
            let e = out.entry(step).or_insert(PersistedStep { step, world_size: 0, ranks: vec![], committed: false });
            match (parts.get(1).map(String::as_str), parts.get(2)) {
                (Some("COMMIT"), None) => e.committed = true,
                (Some("ranks"), Some(f)) => {
                    if let Some((r, w)) = f.strip_suffix(".json").and_then(parse_rank_stem) {
                        e.ranks.push(r);
                        e.world_size = w;
                    }
                }
                _ => {}
            }
        }
        Ok(out
            .into_values()
            .map(|mut s| {
                s.ranks.sort_unstable();
                s
            })
            .collect())
    }

    /// Newest committed step.
    pub async fn latest_committed(&self, ns: &str) -> Result<Option<u64>> {
        Ok(self.steps(ns).await?.iter().rev().find(|s| s.committed).map(|s| s.step))
    }

    /// The committed record of one rank, or `NotFound`.
    pub async fn committed_rank(&self, key: &ShardKey) -> Result<RankRecord> {
        let c = match self.commit_record(&key.namespace, key.step).await {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(TierError::NotFound(format!(
                    "{}/step {} is not committed in {}",
                    key.namespace, key.step, self.url
                )))
            }
            r => r?,
        };
        c.shards
            .into_iter()
            .find(|r| r.manifest.key == *key)
            .ok_or_else(|| TierError::NotFound(format!("shard {key} in the commit of {}", self.url)))
    }

    /// A committed shard's manifest and a stream of its bytes (the caller
    /// verifies them as they arrive, e.g. with `StreamVerifier`).
    pub async fn fetch(
        &self,
        key: &ShardKey,
    ) -> Result<(Manifest, futures_util::stream::BoxStream<'static, Result<Bytes>>)> {
        let r = self.committed_rank(key).await?;
        if r.reduced.is_some() {
            let bytes = self.rebuild(r.clone()).await?;
            return Ok((r.manifest, futures_util::stream::once(async move { Ok(bytes) }).boxed()));
        }
        let path = ObjPath::from(r.data.as_str());
        let what = format!("shard {key}");
        if let Some(root) = &self.local_root {
            // object_store reads local files 8 KiB at a time; read 4 MiB pieces.
            let file = root.join(path.as_ref());
            let f = tokio::fs::File::open(&file).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    TierError::NotFound(format!("{what} in {} ({})", self.url, file.display()))
                }
                _ => TierError::io(format!("opening {}", file.display()), e),
            })?;
            let stream = futures_util::stream::unfold(Some(f), move |f| async move {
                use tokio::io::AsyncReadExt;
                let mut f = f?;
                let mut buf = bytes::BytesMut::zeroed(4 << 20);
                let mut n = 0;
                while n < buf.len() {
                    match f.read(&mut buf[n..]).await {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => return Some((Err(TierError::io("reading a persisted shard", e)), None)),
                    }
                }
                if n == 0 {
                    return None;
                }
                buf.truncate(n);
                Some((Ok(buf.freeze()), Some(f)))
            });
            return Ok((r.manifest, stream.boxed()));
        }
        let got = self
            .retry(&what, || async { self.store.get(&path).await.map_err(|e| store_err(&self.url, &what, e)) })
            .await?;
        let url = self.url.clone();
        let stream = got.into_stream().map(move |b| b.map_err(|e| store_err(&url, "reading a shard", e)));
        Ok((r.manifest, stream.boxed()))
    }

    async fn get_bytes(&self, path: &ObjPath, what: &str) -> Result<Bytes> {
        self.retry(what, || async {
            let r = self.store.get(path).await.map_err(|e| store_err(&self.url, what, e))?;
            r.bytes().await.map_err(|e| store_err(&self.url, what, e))
        })
        .await
    }

    /// The shard bytes of a reduced rank record: its blob decoded on the
    /// bytes of its base, rebuilt the same way, down to a full one. Every
    /// chunk of every step is verified against its manifest on the way.
    async fn rebuild(&self, top: RankRecord) -> Result<Bytes> {
        let mut chain = vec![top];
        while let Some(b) = chain.last().and_then(|r| r.reduced.as_ref()?.base_step) {
            if chain.len() > 1024 {
                return Err(TierError::InvalidArgument(format!(
                    "delta chain of {} is longer than 1024",
                    chain[0].manifest.key
                )));
            }
            let below = &chain[chain.len() - 1].manifest.key;
            let key = ShardKey::new(below.namespace.clone(), b, below.rank);
            let base = self.committed_rank(&key).await.map_err(|e| match e.kind() {
                ErrorKind::NotFound => TierError::NotFound(format!(
                    "the delta base of {below} (step {b}) is missing from {}: {e}",
                    self.url
                )),
                _ => e,
            })?;
            chain.push(base);
        }
        let mut below: Option<(Bytes, Manifest)> = None;
        for r in chain.into_iter().rev() {
            let path = ObjPath::from(r.data.as_str());
            let label = format!("{}/{}", self.url, r.data);
            let stored = self.get_bytes(&path, &format!("shard {}", r.manifest.key)).await?;
            let m = r.manifest.clone();
            let bytes = match r.reduced {
                None => {
                    verify_chunks(&stored, &m, &label)?;
                    stored
                }
                Some(_) => {
                    if let (Some(want), Some((_, bm))) = (reduce::base_of(&stored)?, below.as_ref()) {
                        if !want.matches(bm) {
                            return Err(TierError::Corrupt(tierckpt_format::FormatError::InvalidArgument(format!(
                                "{label} is a delta against step {} other than the stored one ({:?} vs {:?})",
                                want.step,
                                want,
                                BaseRef::of(bm)
                            ))));
                        }
                    }
                    let base = below.take().map(|(b, _)| b);
                    tokio::task::spawn_blocking(move || -> Result<Bytes> {
                        let mut out = vec![0u8; m.file_len as usize];
                        reduce::decode_into(&stored, &m, base.as_deref(), &mut out, &label)?;
                        Ok(Bytes::from(out))
                    })
                    .await
                    .map_err(|e| TierError::Unavailable(format!("decoding worker failed: {e}")))??
                }
            };
            below = Some((bytes, r.manifest));
        }
        Ok(below.expect("the chain holds the requested shard").0)
    }

    /// Deletes a step: its COMMIT first (so readers stop seeing it), then
    /// everything under it.
    pub async fn delete(&self, ns: &str, step: u64) -> Result<u64> {
        validate_namespace(ns)?;
        self.remove(&self.commit_path(ns, step)).await?;
        let all = self.list_all(&self.step_dir(ns, step)).await?;
        let n = all.len() as u64;
        for p in all {
            self.remove(&p).await?;
        }
        Ok(n)
    }

    /// Deletes the data objects under a committed step that its COMMIT does
    /// not reference (left by an upload that was cut off or lost a race).
    pub async fn clean_unreferenced(&self, ns: &str, step: u64) -> Result<u64> {
        let c = self.commit_record(ns, step).await?;
        let referenced: std::collections::HashSet<&str> = c.shards.iter().map(|r| r.data.as_str()).collect();
        let mut n = 0;
        for p in self.list_all(&self.child(&[ns, &step_name(step), "data"])).await? {
            if !referenced.contains(p.as_ref()) {
                self.remove(&p).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Keeps the newest `keep_last` committed steps (and, with a nonzero
    /// `keep_every`, every step that is a multiple of it), and every step one
    /// of those needs as a delta base; deletes older committed steps and
    /// uncommitted leftovers older than the newest commit. Never deletes the
    /// newest committed step. Returns the steps deleted.
    pub async fn retain(&self, ns: &str, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let steps = self.steps(ns).await?;
        let committed: Vec<u64> = steps.iter().filter(|s| s.committed).map(|s| s.step).collect();
        let Some(&newest) = committed.last() else { return Ok(vec![]) };
        let keep_from = committed.len().saturating_sub(keep_last.max(1));
        let mut kept: Vec<u64> = committed[keep_from..].to_vec();
        kept.extend(committed.iter().filter(|&&s| keep_every > 0 && s % keep_every == 0));
        // A kept step's delta bases, and theirs, are kept too.
        let mut todo = kept.clone();
        while let Some(s) = todo.pop() {
            for r in self.commit_record(ns, s).await?.shards {
                if let Some(b) = r.reduced.and_then(|x| x.base_step) {
                    if !kept.contains(&b) {
                        kept.push(b);
                        todo.push(b);
                    }
                }
            }
        }
        let mut deleted = Vec::new();
        for s in &steps {
            let keep = kept.contains(&s.step)
                || s.step >= newest
                || (s.committed && keep_every > 0 && s.step % keep_every == 0);
            if !keep {
                self.delete(ns, s.step).await?;
                deleted.push(s.step);
            }
        }
        Ok(deleted)
    }

    pub async fn namespaces(&self) -> Result<Vec<String>> {
        let listed = self
            .retry("listing namespaces", || async {
                self.store
                    .list_with_delimiter(Some(&self.prefix))
                    .await
                    .map_err(|e| store_err(&self.url, "listing namespaces", e))
            })
            .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(String::from))
            .filter(|n| validate_namespace(n).is_ok())
            .collect())
    }
}

#[async_trait]
impl Tier for PersistentTier {
    fn name(&self) -> &str {
        "persistent"
    }

    /// Streams the shard into memory, each chunk verified on the way in.
    async fn copy_to_memory(&self, key: &ShardKey, memory: &Arc<MemoryTier>) -> Result<()> {
        let (m, stream) = self.fetch(key).await?;
        match crate::receive::receive(memory, &m, self.url(), stream, None).await {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Uploads and claims the shard, then commits its step if complete.
    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()> {
        manifest.check_len(data.len())?;
        self.upload(manifest, Bytes::copy_from_slice(data)).await?;
        self.try_commit(&manifest.key.namespace, manifest.key.step, manifest.world_size).await?;
        Ok(())
    }

    async fn get(&self, key: &ShardKey) -> Result<(Manifest, ShardBytes)> {
        let (m, stream) = self.fetch(key).await?;
        let mut v = StreamVerifier::new(&m, format!("{}/{}", self.url, key));
        let mut out = Vec::with_capacity(m.file_len as usize);
        let mut stream = std::pin::pin!(stream);
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            v.feed(&piece)?;
            out.extend_from_slice(&piece);
        }
        v.finish()?;
        Ok((m, ShardBytes::Owned(out)))
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Manifest> {
        Ok(self.committed_rank(key).await?.manifest)
    }

    async fn list_namespaces(&self) -> Result<Vec<String>> {
        self.namespaces().await
    }

    async fn list_steps(&self, namespace: &str) -> Result<Vec<StepSummary>> {
        Ok(self
            .steps(namespace)
            .await?
            .into_iter()
            .map(|s| StepSummary {
                step: s.step,
                world_size: s.world_size,
                complete: s.committed,
                ranks: s.ranks,
                in_progress: vec![],
                bytes: 0,
                created_unix_ms: 0,
            })
            .collect())
    }

    async fn delete_step(&self, namespace: &str, step: u64) -> Result<()> {
        if self.delete(namespace, step).await? == 0 {
            return Err(TierError::NotFound(format!("{namespace}/step {step} in {}", self.url)));
        }
        Ok(())
    }

    async fn latest(&self, namespace: &str) -> Result<Option<u64>> {
        self.latest_committed(namespace).await
    }
}

//! A fault-injecting adapter around any object store, for tests: a share of
//! requests fail as a throttled or broken server would answer (before they
//! reach the store, so they have no effect), and every request can be slowed.
//! Configured with a spec such as `"fail=0.3,delay=5ms,seed=7"`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, UploadPart,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::TierError;

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    /// Share of requests that fail, 0 to 1.
    pub fail: f64,
    /// Added to every request.
    pub delay: Duration,
    /// Seeds the choice of failing requests: the same seed fails the same
    /// requests of the same sequence.
    pub seed: u64,
}

impl FaultSpec {
    /// Parses `"fail=0.3,delay=5ms,seed=7"` (every key optional).
    pub fn parse(spec: &str) -> Result<Self, TierError> {
        let mut f = FaultSpec { fail: 0.0, delay: Duration::ZERO, seed: 1 };
        for kv in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv.trim().split_once('=').ok_or_else(|| bad(kv))?;
            match k {
                "fail" => f.fail = v.parse().ok().filter(|x: &f64| (0.0..=1.0).contains(x)).ok_or_else(|| bad(kv))?,
                "delay" => {
                    let ms = v.strip_suffix("ms").and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| bad(kv))?;
                    f.delay = Duration::from_millis(ms);
                }
                "seed" => f.seed = v.parse().map_err(|_| bad(kv))?,
                _ => return Err(bad(kv)),
            }
        }
        Ok(f)
    }
}

fn bad(kv: &str) -> TierError {
    TierError::InvalidArgument(format!("fault spec item {kv:?} is not fail=<0..1>, delay=<N>ms or seed=<N>"))
}

/// Coin flips shared by a store and its uploads, the same sequence for the
/// same seed.
#[derive(Debug)]
struct Dice {
    rng: Mutex<SmallRng>,
    fail: f64,
    delay: Duration,
}

impl Dice {
    fn new(spec: FaultSpec) -> Self {
        Self { rng: Mutex::new(SmallRng::seed_from_u64(spec.seed)), fail: spec.fail, delay: spec.delay }
    }

    /// True when this request should fail (with probability `fail`).
    fn roll(&self) -> bool {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).random::<f64>() < self.fail
    }

    async fn gate(&self, op: &str) -> object_store::Result<()> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail > 0.0 && self.roll() {
            return Err(injected(op));
        }
        Ok(())
    }
}

fn injected(op: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: format!("injected fault on {op}: 503 SlowDown, please reduce your request rate").into(),
    }
}

/// An object store that fails and slows requests to another as a
/// [`FaultSpec`] says.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    dice: Arc<Dice>,
}

impl FaultyStore {
    /// Wraps `inner`, injecting what `spec` says.
    pub fn new(inner: Arc<dyn ObjectStore>, spec: FaultSpec) -> Self {
        Self { inner, dice: Arc::new(Dice::new(spec)) }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?})", self.inner)
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    dice: Arc<Dice>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let dice = self.dice.clone();
        if dice.fail > 0.0 && dice.roll() {
            return Box::pin(async move { Err(injected("put_part")) });
        }
        let part = self.inner.put_part(data);
        Box::pin(async move {
            if !dice.delay.is_zero() {
                tokio::time::sleep(dice.delay).await;
            }
            part.await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.dice.gate("complete").await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.dice.gate("put").await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.dice.gate("create multipart upload").await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload { inner, dice: self.dice.clone() }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.dice.gate("get").await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.dice.fail > 0.0 && self.dice.roll() {
            return futures_util::stream::once(async { Err(injected("list")) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.dice.gate("list").await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.dice.gate("copy").await?;
        self.inner.copy_opts(from, to, options).await
    }
}

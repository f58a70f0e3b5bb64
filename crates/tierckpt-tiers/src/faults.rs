//! A fault-injecting adapter around any object store, for tests: a share of
//! requests fail as a throttled or broken server would answer (before they
//! reach the store, so they have no effect), requests beyond a rate are
//! refused as a throttling server refuses them, and every request can be
//! slowed. Configured with a spec such as `"fail=0.3,delay=5ms,rate=50,seed=7"`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Requests a second the store takes (a burst of as many); the rest
    /// are refused with 503 SlowDown. None: no limit.
    pub rate: Option<f64>,
    /// Seeds the choice of failing requests: the same seed fails the same
    /// requests of the same sequence.
    pub seed: u64,
}

impl FaultSpec {
    /// Parses `"fail=0.3,delay=5ms,rate=50,seed=7"` (every key optional).
    pub fn parse(spec: &str) -> Result<Self, TierError> {
        let mut f = FaultSpec { fail: 0.0, delay: Duration::ZERO, rate: None, seed: 1 };
        for kv in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv.trim().split_once('=').ok_or_else(|| bad(kv))?;
            match k {
                "fail" => f.fail = v.parse().ok().filter(|x: &f64| (0.0..=1.0).contains(x)).ok_or_else(|| bad(kv))?,
                "delay" => {
                    let ms = v.strip_suffix("ms").and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| bad(kv))?;
                    f.delay = Duration::from_millis(ms);
                }
                "rate" => {
                    f.rate = Some(v.parse().ok().filter(|r: &f64| *r > 0.0 && r.is_finite()).ok_or_else(|| bad(kv))?)
                }
                "seed" => f.seed = v.parse().map_err(|_| bad(kv))?,
                _ => return Err(bad(kv)),
            }
        }
        Ok(f)
    }
}

fn bad(kv: &str) -> TierError {
    TierError::InvalidArgument(format!(
        "fault spec item {kv:?} is not fail=<0..1>, delay=<N>ms, rate=<requests per second> or seed=<N>"
    ))
}

/// Coin flips and the rate limit shared by a store and its uploads, the
/// same sequence of flips for the same seed.
#[derive(Debug)]
struct Dice {
    rng: Mutex<SmallRng>,
    fail: f64,
    delay: Duration,
    bucket: Option<Mutex<Bucket>>,
}

/// A token bucket: `rate` tokens a second, at most `rate` held.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token if one is there.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }
}

impl Dice {
    fn new(spec: FaultSpec) -> Self {
        let bucket = spec.rate.map(|rate| Mutex::new(Bucket { rate, tokens: rate, at: Instant::now() }));
        Self { rng: Mutex::new(SmallRng::seed_from_u64(spec.seed)), fail: spec.fail, delay: spec.delay, bucket }
    }

    /// The injected error for this request, if it gets one: over the rate,
    /// or failing (with probability `fail`).
    fn refusal(&self, op: &str) -> Option<object_store::Error> {
        if let Some(b) = &self.bucket {
            let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
            if !b.take() {
                return Some(injected(op, &format!("over {} requests a second", b.rate)));
            }
        }
        let failed = self.fail > 0.0 && self.rng.lock().unwrap_or_else(|p| p.into_inner()).random::<f64>() < self.fail;
        failed.then(|| injected(op, "injected"))
    }

    async fn gate(&self, op: &str) -> object_store::Result<()> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match self.refusal(op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn injected(op: &str, why: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: format!("{why} fault on {op}: 503 SlowDown, please reduce your request rate").into(),
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
        if let Some(e) = dice.refusal("put_part") {
            return Box::pin(async move { Err(e) });
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
        if let Some(e) = self.dice.refusal("list") {
            return futures_util::stream::once(async { Err(e) }).boxed();
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

//! Requests to the store: retries with backoff and jitter, small and
//! multipart puts, fsync of local uploads, existence, removal, listing,
//! reads.

use super::*;

impl PersistentTier {
    /// Runs `op` with exponential backoff and jitter on transient errors.
    pub(super) async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
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

    pub(super) async fn put_small(&self, path: &ObjPath, bytes: Bytes, mode: PutMode, what: &str) -> Result<()> {
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

    pub(super) async fn put_multipart(&self, path: &ObjPath, data: &Bytes, what: &str) -> Result<()> {
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
    pub(super) fn sync_local(&self, path: &ObjPath) -> Result<()> {
        let Some(root) = &self.local_root else { return Ok(()) };
        let file = root.join(path.as_ref());
        let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        sync(&file)
            .and_then(|()| sync(file.parent().unwrap_or(root)))
            .map_err(|e| TierError::io(format!("fsync of {}", file.display()), e))
    }

    pub(super) async fn exists(&self, path: &ObjPath, what: &str) -> Result<bool> {
        self.retry(what, || async {
            match self.store.head(path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(store_err(&self.url, what, e)),
            }
        })
        .await
    }

    pub(super) async fn remove(&self, path: &ObjPath) -> Result<()> {
        let what = format!("deleting {path}");
        self.retry(&what, || async {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(store_err(&self.url, &what, e)),
            }
        })
        .await
    }

    pub(super) async fn list_all(&self, prefix: &ObjPath) -> Result<Vec<ObjPath>> {
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

    pub(super) async fn read_json<T: for<'de> Deserialize<'de>>(&self, path: &ObjPath, what: &str) -> Result<T> {
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

    pub(super) async fn get_bytes(&self, path: &ObjPath, what: &str) -> Result<Bytes> {
        self.retry(what, || async {
            let r = self.store.get(path).await.map_err(|e| store_err(&self.url, what, e))?;
            r.bytes().await.map_err(|e| store_err(&self.url, what, e))
        })
        .await
    }
}

//! Reads of committed state: commit records, steps, the newest commit, a
//! rank's record, and a shard's bytes (rebuilt down its delta chain).

use super::*;

impl PersistentTier {
    /// The COMMIT of a step.
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
        self.latest_committed_except(ns, &std::collections::BTreeSet::new()).await
    }

    /// Newest committed step of `ns` that is not in `skip`.
    pub async fn latest_committed_except(
        &self,
        ns: &str,
        skip: &std::collections::BTreeSet<u64>,
    ) -> Result<Option<u64>> {
        Ok(self.steps(ns).await?.iter().rev().find(|s| s.committed && !skip.contains(&s.step)).map(|s| s.step))
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

    /// The shard bytes of a reduced rank record: its blob decoded on the
    /// bytes of its base, rebuilt the same way, down to a full one. Every
    /// chunk of every step is verified against its manifest on the way.
    pub(super) async fn rebuild(&self, top: RankRecord) -> Result<Bytes> {
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
}

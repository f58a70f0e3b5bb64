//! Uploads: a shard (encoded as a delta or compressed where that pays) to
//! a path of its own, its create-only rank record, and the create-only
//! COMMIT once every rank is there.

use super::*;

impl PersistentTier {
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
    pub(super) async fn store_shard(
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
}

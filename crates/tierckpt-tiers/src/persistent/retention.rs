//! Deletes, the clean-up of objects no commit references, retention, and
//! the namespaces listed.

use super::*;

/// A pin as recorded in the store, `<ns>/pins/<step:020>.json`.
#[derive(Serialize, Deserialize)]
struct StoredPin {
    step: u64,
    #[serde(default)]
    names: Vec<String>,
}

impl PersistentTier {
    /// Deletes a step: its COMMIT first (so readers stop seeing it), then
    /// everything under it, leftovers of interrupted uploads included.
    pub async fn delete(&self, ns: &str, step: u64) -> Result<u64> {
        validate_namespace(ns)?;
        self.remove(&self.commit_path(ns, step)).await?;
        let all = self.list_all(&self.step_dir(ns, step)).await?;
        let n = all.len() as u64;
        for p in all {
            self.remove(&p).await?;
        }
        Ok(n + self.clean_interrupted_in_step(ns, step).await?)
    }

    /// Deletes the data objects under a committed step that its COMMIT does
    /// not reference (left by an upload that was cut off or lost a race),
    /// and the staging files of interrupted uploads (`leftovers`).
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
        Ok(n + self.clean_interrupted_in_step(ns, step).await?)
    }

    /// Where the pin of `step` of `ns` is recorded.
    fn pin_path(&self, ns: &str, step: u64) -> ObjPath {
        self.child(&[ns, "pins", &format!("{}.json", step_name(step))])
    }

    /// Records a pin of `step` of `ns` with its names (replacing any
    /// record of it): retention keeps the step, for every node.
    pub async fn put_pin(&self, ns: &str, step: u64, names: &[String]) -> Result<()> {
        validate_namespace(ns)?;
        let body = serde_json::to_vec(&StoredPin { step, names: names.to_vec() })
            .map_err(|e| TierError::InvalidArgument(e.to_string()))?;
        self.put_small(&self.pin_path(ns, step), body.into(), PutMode::Overwrite, &format!("pin of {ns}/step {step}"))
            .await
    }

    /// Removes the pin record of `step` of `ns` (none is fine).
    pub async fn remove_pin(&self, ns: &str, step: u64) -> Result<()> {
        validate_namespace(ns)?;
        self.remove(&self.pin_path(ns, step)).await
    }

    /// The pinned steps of `ns` and their names; a record that does not
    /// parse is skipped (and logged).
    pub async fn pins(&self, ns: &str) -> Result<std::collections::BTreeMap<u64, Vec<String>>> {
        validate_namespace(ns)?;
        let mut out = std::collections::BTreeMap::new();
        for p in self.list_all(&self.child(&[ns, "pins"])).await? {
            let what = format!("pin record {p}");
            let bytes = match self.get_bytes(&p, &what).await {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match serde_json::from_slice::<StoredPin>(&bytes) {
                Ok(pin) => {
                    out.insert(pin.step, pin.names);
                }
                Err(e) => tracing::warn!(record = %p, error = %e, "skipping an unreadable pin record"),
            }
        }
        Ok(out)
    }

    /// Keeps the newest `keep_last` committed steps (and, with a nonzero
    /// `keep_every`, every step that is a multiple of it), the pinned steps
    /// ([`Self::put_pin`]), and every step one of those needs as a delta
    /// base; deletes older committed steps and uncommitted leftovers older
    /// than the newest commit. Never deletes the newest committed step.
    /// Returns the steps deleted.
    pub async fn retain(&self, ns: &str, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let steps = self.steps(ns).await?;
        let committed: Vec<u64> = steps.iter().filter(|s| s.committed).map(|s| s.step).collect();
        let Some(&newest) = committed.last() else { return Ok(vec![]) };
        let keep_from = committed.len().saturating_sub(keep_last.max(1));
        let mut kept: Vec<u64> = committed[keep_from..].to_vec();
        kept.extend(committed.iter().filter(|&&s| keep_every > 0 && s % keep_every == 0));
        let pins = self.pins(ns).await?;
        kept.extend(committed.iter().filter(|s| pins.contains_key(s)));
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
                || pins.contains_key(&s.step)
                || s.step >= newest
                || (s.committed && keep_every > 0 && s.step % keep_every == 0);
            if !keep {
                self.delete(ns, s.step).await?;
                deleted.push(s.step);
            }
        }
        Ok(deleted)
    }

    /// Namespaces with anything stored.
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

//! Replication: pushing each shard sealed here to its placement targets
//! (whole, sparse or encoded, whichever the measured costs say is
//! fastest), re-replication after a node is lost, and the copies a node
//! that leaves hands over.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tierckpt_format::{BaseRef, Manifest, ShardKey};
use tierckpt_tiers::receive::unchanged_chunk;
use tierckpt_tiers::{ErrorKind, TierError};
use tokio::sync::mpsc;

use super::placement::targets_of;
use super::{lock, random_u64, Cluster};
use crate::peer::{Pace, ReplicaBody};

/// The first wait before a replica push is retried; it doubles per retry.
const PUSH_BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a replica push.
const PUSH_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Retries of a replica push after its first try.
const PUSH_RETRIES: u32 = 3;

/// What pushing replicas has cost so far, to decide whether encoding one
/// pays: compressing saves wire time and costs codec time (encoding here,
/// decoding on the peer), so it pays on a slow or capped link and not on a
/// fast one. Both costs are moving averages of what pushes measured.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ReplicaCosts {
    /// Seconds per byte on the wire, from pushes the peer does not decode
    /// (whole or sparse).
    wire_s_per_byte: Option<f64>,
    /// Seconds per shard byte that encoding and decoding add.
    codec_s_per_byte: Option<f64>,
}

/// Weight of the newest measurement in [`ReplicaCosts`].
const COST_WEIGHT: f64 = 0.3;
/// Until both costs are measured, a replica is encoded if expected to take
/// at most this share of the bytes it would send otherwise.
const ENCODE_UNMEASURED_BELOW: f64 = 0.5;

impl ReplicaCosts {
    fn blend(old: Option<f64>, new: f64) -> Option<f64> {
        Some(old.map_or(new, |o| o + COST_WEIGHT * (new - o)))
    }

    /// A push of `wire` bytes the peer took as they are, in `secs`.
    fn observe_plain(&mut self, wire: u64, secs: f64) {
        if wire >= 1 << 20 {
            self.wire_s_per_byte = Self::blend(self.wire_s_per_byte, secs / wire as f64);
        }
    }

    /// An encoded push of a `raw`-byte shard as `wire` bytes, `secs` from
    /// the start of encoding to the peer's answer (after decoding).
    fn observe_encoded(&mut self, raw: u64, wire: u64, secs: f64) {
        if raw >= 1 << 20 {
            let on_wire = self.wire_s_per_byte.unwrap_or(0.0) * wire as f64;
            self.codec_s_per_byte = Self::blend(self.codec_s_per_byte, (secs - on_wire).max(0.0) / raw as f64);
        }
    }

    /// Whether sending a `raw`-byte shard encoded, expected at `ratio` of
    /// `raw`, should beat sending `plain` bytes as they are.
    fn encode_pays(&self, raw: u64, plain: u64, ratio: f64) -> bool {
        let encoded = ratio * raw as f64;
        match (self.wire_s_per_byte, self.codec_s_per_byte) {
            (Some(w), Some(c)) => c * raw as f64 + w * encoded < w * plain as f64,
            _ => encoded < ENCODE_UNMEASURED_BELOW * plain as f64,
        }
    }
}

impl Cluster {
    pub(super) async fn replicate_loop(
        self: std::sync::Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<ShardKey>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let key = tokio::select! {
                _ = stop.changed() => return,
                k = rx.recv() => match k { Some(k) => k, None => return },
            };
            self.stats_update(|s| s.queued = s.queued.saturating_sub(1));
            let pushes = self.my_targets().into_iter().map(|t| {
                let key = key.clone();
                let c = self.clone();
                async move { c.push(&key, &t, false).await }
            });
            for r in futures_util::future::join_all(pushes).await {
                if let Err(e) = r {
                    tracing::warn!(shard = %key, error = %e, "replication failed; re-replication will retry");
                }
            }
        }
    }

    /// Sends a local shard to node `t`; true if sent, false if `t` held it
    /// already. Pushes only to a node that answers heartbeats (waiting while
    /// it does not, giving up once it is dead, and abandoning a push when it
    /// dies meanwhile); retries transient failures with exponential backoff
    /// (capped, with jitter), each retry, and with `check_first` the first
    /// try too, first asking the node whether it holds the shard already.
    pub(super) async fn push(&self, key: &ShardKey, t: &str, check_first: bool) -> Result<bool, TierError> {
        let fail = |e: TierError| {
            self.stats_update(|s| s.failures += 1);
            e
        };
        self.until_answering(t).await?;
        let tier = self.tier.clone();
        let k = key.clone();
        let (m, map) = tokio::task::spawn_blocking(move || tier.map_leased(&k))
            .await
            .map_err(|e| TierError::Unavailable(e.to_string()))??;
        let data = Bytes::from_owner(map);
        let pace = self.cfg.replication_bandwidth.map(|b| Pace { bytes_per_s: b });
        let started = Instant::now();
        let mut body = self.replica_body(t, &m, &data).await;
        let prepared = started.elapsed();
        let mut delay = PUSH_BACKOFF_FIRST;
        let mut attempt = 0;
        loop {
            let outcome = async {
                self.until_answering(t).await?;
                if (attempt > 0 || check_first) && self.peer_holds(t, key).await? {
                    return Ok(false);
                }
                self.stats_update(|s| {
                    s.pushes_attempted += 1;
                    s.wire_bytes_attempted += body.wire_len();
                });
                let addr = self.addr_of(t)?;
                let dead = async {
                    self.until_dead(t).await;
                    Err(TierError::Unavailable(format!("node {t} died or left during the push")))
                };
                tokio::select! {
                    r = self.peers.put_replica(&addr, &m, &body, pace) => r.map(|()| true),
                    r = dead => r,
                }
            }
            .await;
            let delta = body.is_delta();
            match outcome {
                Ok(false) => {
                    tracing::debug!(shard = %key, to = t, "the peer holds it already; not sent");
                    self.delivered(t, key, false);
                    return Ok(false);
                }
                Ok(true) => {
                    lock(&self.pushed).insert((t.to_string(), key.clone()), Instant::now());
                    let mut sent = lock(&self.sent);
                    let last = sent.entry((t.to_string(), key.namespace.clone(), key.rank)).or_insert(key.step);
                    *last = (*last).max(key.step);
                    drop(sent);
                    let wire = body.wire_len();
                    let secs = started.elapsed().as_secs_f64();
                    let encoded = matches!(body, ReplicaBody::Reduced { .. });
                    match encoded {
                        true => lock(&self.costs).observe_encoded(m.file_len, wire, secs),
                        false => lock(&self.costs).observe_plain(wire, secs - prepared.as_secs_f64()),
                    }
                    self.stats_update(|s| {
                        s.encoded_shards_sent += u64::from(encoded);
                        s.shards_sent += 1;
                        s.bytes_sent += m.file_len;
                        s.wire_bytes_sent += wire;
                        s.delta_shards_sent += u64::from(delta);
                    });
                    self.metrics.replicated(started.elapsed());
                    self.delivered(t, key, true);
                    tracing::debug!(
                        shard = %key,
                        to = t,
                        bytes = m.file_len,
                        wire,
                        delta,
                        prepare_ms = prepared.as_millis() as u64,
                        total_ms = started.elapsed().as_millis() as u64,
                        "replicated"
                    );
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    self.delivered(t, key, false);
                    return Ok(false);
                }
                // The peer no longer holds the base: send the shard whole.
                Err(e) if delta && e.kind() == ErrorKind::NotFound => {
                    tracing::debug!(shard = %key, to = t, error = %e, "delta refused; sending whole");
                    self.stats_update(|s| s.deltas_refused += 1);
                    body = ReplicaBody::Whole(data.clone());
                }
                Err(e) if self.is_gone(t) => return Err(fail(e)),
                Err(e) if e.is_retryable() && attempt < PUSH_RETRIES => {
                    tracing::debug!(shard = %key, to = t, attempt, error = %e, "push failed; backing off");
                    let jitter = random_u64() % (delay.as_millis() as u64 / 2 + 1);
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(PUSH_BACKOFF_CAP);
                    attempt += 1;
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }

    /// The newest step before `key`'s of which this node and node `t` hold
    /// the same rank: the base of a delta to `t`. Mapped here under a lease.
    async fn shared_base(&self, t: &str, key: &ShardKey) -> Option<(Manifest, tierckpt_tiers::LeasedMap)> {
        let target = t.to_string();
        let me = self.cfg.node_id.clone();
        let seen = self
            .view()
            .remove(&key.namespace)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.step < key.step)
            .filter(|s| s.holders.get(&key.rank).is_some_and(|h| h.contains(&target) && h.contains(&me)))
            .map(|s| s.step)
            .max();
        // What this node sent there lately, which the view may not show yet.
        let sent =
            lock(&self.sent).get(&(t.to_string(), key.namespace.clone(), key.rank)).copied().filter(|&s| s < key.step);
        let mut candidates: Vec<u64> = [sent, seen].into_iter().flatten().collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        candidates.dedup();
        for step in candidates {
            let (tier, k) = (self.tier.clone(), ShardKey::new(key.namespace.clone(), step, key.rank));
            if let Ok(Ok(held)) = tokio::task::spawn_blocking(move || tier.map_leased(&k)).await {
                return Some(held);
            }
        }
        None
    }

    /// What to send node `t` for `m`:
    /// - with delta on, the chunks that differ from a base both nodes hold
    ///   (sparse: no encoding, no copy), else the shard whole;
    /// - unless, with compression on, the reduced blob
    ///   (`tierckpt_format::encode`) is expected to be faster to send, as
    ///   [`ReplicaCosts`] measured.
    async fn replica_body(&self, t: &str, m: &Manifest, data: &Bytes) -> ReplicaBody {
        let opts = self.cfg.replication_reduce;
        let base = match opts.delta {
            true => self.shared_base(t, &m.key).await,
            false => None,
        };
        let base = base.map(|(bm, map)| (bm, Bytes::from_owner(map)));
        let sparse = base.as_ref().and_then(|(bm, _)| {
            let changed: Vec<usize> = (0..m.chunks.len()).filter(|&i| !unchanged_chunk(bm, m, i)).collect();
            let pieces = changed.iter().map(|&i| {
                let (a, b) = m.chunk_range(i);
                data.slice(a as usize..b as usize)
            });
            (changed.len() < m.chunks.len())
                .then(|| ReplicaBody::Sparse { base: BaseRef::of(bm), pieces: pieces.collect() })
        });
        let plain = sparse.unwrap_or_else(|| ReplicaBody::Whole(data.clone()));
        if opts.compression == tierckpt_format::Compression::Off {
            return plain;
        }
        let (m2, d2, plain_len, costs) = (m.clone(), data.clone(), plain.wire_len(), *lock(&self.costs));
        let encoded = tokio::task::spawn_blocking(move || {
            let b = base.as_ref().map(|(bm, b)| (&b[..], bm));
            let ratio = tierckpt_format::estimate(&d2, &m2, b, &opts);
            if !costs.encode_pays(m2.file_len, plain_len, ratio) {
                return None;
            }
            tierckpt_format::encode(&d2, &m2, b, &opts).ok()
        })
        .await
        .ok()
        .flatten();
        match encoded {
            Some((blob, stats)) if (blob.len() as u64) < plain_len => {
                ReplicaBody::Reduced { blob: Bytes::from(blob), delta: stats.same_chunks + stats.xor_chunks > 0 }
            }
            _ => plain,
        }
    }

    /// Stores a whole copy of a shard on each of this node's placement
    /// targets (what the replicator does for shards sealed here).
    pub(crate) async fn put_copies(&self, m: &Manifest, data: Bytes) -> Result<(), TierError> {
        let body = ReplicaBody::Whole(data);
        for t in self.my_targets() {
            self.peers.put_replica(&self.addr_of(&t)?, m, &body, None).await?;
        }
        Ok(())
    }

    /// Restores k+1 copies of the newest complete step of each namespace on
    /// live nodes. Among the live holders of a shard, the first in member
    /// order does the work, sending to its placement targets first, then
    /// to the next nodes in ring order; shards younger than twice the
    /// heartbeat timeout are left to the replicator.
    pub(super) async fn rereplicate(&self) {
        let (order, live) = self.live_order();
        let desired = (self.cfg.replication_factor + 1).min(live.len());
        let grace_ms = 2 * self.cfg.heartbeat_timeout.as_millis() as u64;
        let now_ms = tierckpt_tiers::now_unix_ms();
        let me = self.node_id().to_string();
        for (ns, steps) in self.view() {
            let Some(s) = steps.iter().rev().find(|s| s.complete) else { continue };
            for (rank, holders) in &s.holders {
                let key = ShardKey::new(&ns, s.step, *rank);
                let holders = self.with_recent_pushes(&key, holders, &live);
                if holders.len() >= desired || holders.first() != Some(&me) {
                    continue;
                }
                let young = self.tier.locate(&key).map(|(_, m)| now_ms.saturating_sub(m.created_unix_ms) < grace_ms);
                if young.unwrap_or(true) {
                    continue;
                }
                let targets: Vec<String> = self
                    .preferred_targets(&order)
                    .into_iter()
                    .filter(|id| live.contains(id) && !holders.contains(id))
                    .take(desired - holders.len())
                    .collect();
                for t in targets {
                    // The view may be a heartbeat old: ask the target first.
                    match self.push(&key, &t, true).await {
                        Ok(false) => {}
                        Ok(true) => {
                            self.stats_update(|s| s.rereplicated += 1);
                            tracing::info!(shard = %key, to = %t, "re-replicated to restore k+1 copies");
                        }
                        Err(e) => tracing::warn!(shard = %key, to = %t, error = %e, "re-replication failed"),
                    }
                }
            }
        }
    }

    /// `holders` of `key` from the view, plus the live nodes this node
    /// pushed it to in the last two heartbeat timeouts (the view lags behind
    /// a push: a probe answered after the push may have been sent before it,
    /// so an answer alone does not supersede the entry).
    fn with_recent_pushes(&self, key: &ShardKey, holders: &[String], live: &[String]) -> Vec<String> {
        let mut out = holders.to_vec();
        let grace = 2 * self.cfg.heartbeat_timeout;
        let mut pushed = lock(&self.pushed);
        pushed.retain(|_, at| at.elapsed() < grace);
        for ((t, k), _) in pushed.iter() {
            if k == key && live.contains(t) && !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }

    /// Nodes to copy this node's shards to, best first: its placement
    /// targets in `order`, then every other node in ring order after it.
    pub(super) fn preferred_targets(&self, order: &[String]) -> Vec<String> {
        let me = self.node_id();
        let mut out = targets_of(self.cfg.placement, order, me, self.cfg.replication_factor);
        let i = order.iter().position(|id| id == me).unwrap_or(0);
        for j in 1..order.len() {
            let id = &order[(i + j) % order.len()];
            if !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn encoding_replicas_pays_on_slow_links_only() {
        // Unmeasured: only a large saving is tried.
        let fresh = ReplicaCosts::default();
        assert!(fresh.encode_pays(GIB, GIB, 0.3));
        assert!(!fresh.encode_pays(GIB, GIB / 2, 0.3));
        // A 1.25 GiB/s link (0.8 s/GiB) and a codec adding 0.6 s/GiB.
        let mut fast = ReplicaCosts::default();
        fast.observe_plain(GIB, 0.8);
        fast.observe_encoded(GIB, GIB / 10, 0.68);
        assert!((fast.codec_s_per_byte.unwrap() * GIB as f64 - 0.6).abs() < 1e-9, "{fast:?}");
        // A 0.14 delta against a sparse 0.6: 0.6 + 0.11 s against 0.48 s.
        assert!(!fast.encode_pays(GIB, GIB * 6 / 10, 0.14));
        // A 0.03 delta against the whole shard: 0.62 s against 0.8 s.
        assert!(fast.encode_pays(GIB, GIB, 0.03));
        // The same on a 200 MB/s link (5 s/GiB): the 0.14 delta pays too.
        let mut slow = fast;
        for _ in 0..20 {
            slow.observe_plain(GIB, 5.0);
        }
        assert!(slow.encode_pays(GIB, GIB * 6 / 10, 0.14));
        assert!(!slow.encode_pays(GIB, GIB, 0.95));
    }

    #[test]
    fn small_pushes_do_not_move_the_costs() {
        let mut c = ReplicaCosts::default();
        c.observe_plain(1000, 5.0);
        c.observe_encoded(1000, 10, 5.0);
        assert!(c.wire_s_per_byte.is_none() && c.codec_s_per_byte.is_none());
        c.observe_plain(GIB, 1.0);
        c.observe_plain(GIB, 2.0);
        assert!((c.wire_s_per_byte.unwrap() * GIB as f64 - 1.3).abs() < 1e-9);
    }
}

//! Prometheus metrics of the daemon, served at `/metrics`.
//!
//! Two kinds: counters and latency histograms updated where things happen
//! (seals, reservations, pushes, uploads, restores), and a collector that
//! reads, at scrape time, what other parts already keep: the memory tier's
//! usage, the replicator's counters and per-peer backlog, the drain state per
//! namespace, and the cluster membership. Nothing is counted twice.
//! Every name starts with `tierckpt_` and carries its unit; the families are
//! listed in docs/ARCHITECTURE.md ("Metrics"), and
//! deploy/grafana/tierckpt-dashboard.json charts them.

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tierckpt_proto::NodeState;
use tierckpt_tiers::MemoryTier;

use crate::cluster::Cluster;
use crate::drain::Drainer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    node: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

/// Bucket bounds of every latency histogram, in seconds: 1 ms to 5 min
/// (a reservation takes microseconds to milliseconds; an upload of a large
/// shard, minutes).
pub const LATENCY_BUCKETS: [f64; 17] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Counters and histograms updated where things happen, and the scrape-time
/// collector (see the module docs).
pub struct Metrics {
    registry: Registry,
    shards_sealed: Counter,
    bytes_sealed: Counter,
    unrestorable_steps: Counter,
    node_events: Family<EventLabels, Counter>,
    advice_events: Family<KindLabels, Counter>,
    reserve: Histogram,
    write: Histogram,
    seal: Histogram,
    replicate_push: Histogram,
    persist_upload: Histogram,
    persist_commit: Histogram,
    restore: Family<TierLabels, Histogram, fn() -> Histogram>,
    sources: Arc<Sources>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tierckpt");
        let m = Metrics {
            registry: Registry::default(),
            shards_sealed: Counter::default(),
            bytes_sealed: Counter::default(),
            unrestorable_steps: Counter::default(),
            node_events: Family::default(),
            advice_events: Family::default(),
            reserve: latency(),
            write: latency(),
            seal: latency(),
            replicate_push: latency(),
            persist_upload: latency(),
            persist_commit: latency(),
            restore: Family::new_with_constructor(latency as fn() -> Histogram),
            sources: Arc::new(Sources::default()),
        };
        let r = &mut registry;
        r.register("shards_sealed", "Shards sealed from local writers", m.shards_sealed.clone());
        r.register("sealed_bytes", "Bytes sealed from local writers", m.bytes_sealed.clone());
        r.register(
            "unrestorable_steps",
            "Steps found corrupt on every tier (latest skips them)",
            m.unrestorable_steps.clone(),
        );
        r.register("node_events", "Node state changes seen by this node", m.node_events.clone());
        r.register("advice_events", "Alerts that advised a checkpoint, by kind", m.advice_events.clone());
        r.register(
            "reserve_duration_seconds",
            "Local reservations: request to segment ready (waits for seals included)",
            m.reserve.clone(),
        );
        r.register(
            "write_duration_seconds",
            "A local writer's copy: its reservation answered to its seal request",
            m.write.clone(),
        );
        r.register("seal_duration_seconds", "Seals: checksum start to the shard visible", m.seal.clone());
        r.register(
            "replicate_push_duration_seconds",
            "Replica pushes to a peer that succeeded: preparing the body to the peer's answer (retries included)",
            m.replicate_push.clone(),
        );
        r.register(
            "persist_upload_duration_seconds",
            "Shard uploads to the persistent tier (encoding included)",
            m.persist_upload.clone(),
        );
        r.register(
            "persist_commit_duration_seconds",
            "Steps persisted: the drainer taking the step to the step committed",
            m.persist_commit.clone(),
        );
        r.register(
            "restore_duration_seconds",
            "Restores by the tier that had the copy: finding (memory) or copying it into this node's memory, \
             verified",
            m.restore.clone(),
        );
        r.register_collector(Box::new(m.sources.clone()));
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Lets the collector read the memory tier, the cluster and the drainer
    /// at scrape time (weakly: the metrics never keep them alive).
    pub fn attach(&self, tier: &Arc<MemoryTier>, cluster: Option<&Arc<Cluster>>, drainer: Option<&Arc<Drainer>>) {
        let _ = self.sources.attached.set(Attached {
            tier: Arc::downgrade(tier),
            cluster: cluster.map(Arc::downgrade),
            drainer: drainer.map(Arc::downgrade),
        });
        // The read path's tiers show (at zero) before their first restore.
        let tiers = ["memory"].into_iter().chain(cluster.map(|_| "peer")).chain(drainer.map(|_| "persistent"));
        for t in tiers {
            let _ = self.restore.get_or_create(&TierLabels { tier: t.into() });
        }
    }

    /// A shard was sealed here.
    pub fn sealed(&self, bytes: u64) {
        self.shards_sealed.inc();
        self.bytes_sealed.inc_by(bytes);
    }

    /// A local reservation took `d`.
    pub fn reserved(&self, d: Duration) {
        self.reserve.observe(d.as_secs_f64());
    }

    /// A local writer sealed `d` after its reservation was answered.
    pub fn written(&self, d: Duration) {
        self.write.observe(d.as_secs_f64());
    }

    /// A seal's checksum and publication took `d`.
    pub fn seal_took(&self, d: Duration) {
        self.seal.observe(d.as_secs_f64());
    }

    /// A replica push succeeded after `d`.
    pub fn replicated(&self, d: Duration) {
        self.replicate_push.observe(d.as_secs_f64());
    }

    /// A shard upload to the persistent tier took `d`.
    pub fn uploaded(&self, d: Duration) {
        self.persist_upload.observe(d.as_secs_f64());
    }

    /// A step was committed `d` after the drainer took it.
    pub fn committed(&self, d: Duration) {
        self.persist_commit.observe(d.as_secs_f64());
    }

    /// A restore found its copy in `tier` (memory, peer, persistent) after `d`.
    pub fn restored(&self, tier: &str, d: Duration) {
        self.restore.get_or_create(&TierLabels { tier: tier.into() }).observe(d.as_secs_f64());
    }

    /// A step was found corrupt on every tier.
    pub fn unrestorable(&self) {
        self.unrestorable_steps.inc();
    }

    /// A peer changed state.
    pub fn node_event(&self, node: &str, state: NodeState) {
        self.node_events.get_or_create(&EventLabels { node: node.into(), state: state_name(state).into() }).inc();
    }

    /// An alert advised a checkpoint (`kind` as the advice names it).
    pub fn advised(&self, kind: &str) {
        self.advice_events.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }

    /// The text exposition (OpenMetrics), with the collector's values taken now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Unknown => "unknown",
        NodeState::Alive => "alive",
        NodeState::Suspect => "suspect",
        NodeState::Dead => "dead",
        NodeState::Left => "left",
    }
}

/// What the collector reads at scrape time.
struct Attached {
    tier: Weak<MemoryTier>,
    cluster: Option<Weak<Cluster>>,
    drainer: Option<Weak<Drainer>>,
}

/// The scrape-time collector; empty until [`Metrics::attach`].
#[derive(Default)]
struct Sources {
    attached: OnceLock<Attached>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").field("attached", &self.attached.get().is_some()).finish()
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes families one after another into a collector's encoder. Help
/// texts get the full stop the registry adds to its own; a family without
/// series is left out.
struct Out<'e>(DescriptorEncoder<'e>);

impl Out<'_> {
    fn gauges(&mut self, name: &str, help: &str, rows: &[(Labels<'_>, f64)]) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let kind = ConstGauge::new(0.0).metric_type();
        let mut enc = self.0.encode_descriptor(name, &format!("{help}."), None, kind)?;
        for (labels, v) in rows {
            ConstGauge::new(*v).encode(enc.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        let g = ConstGauge::new(v);
        g.encode(self.0.encode_descriptor(name, &format!("{help}."), None, g.metric_type())?)
    }

    fn counters(&mut self, name: &str, help: &str, rows: &[(Labels<'_>, u64)]) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let kind = ConstCounter::new(0u64).metric_type();
        let mut enc = self.0.encode_descriptor(name, &format!("{help}."), None, kind)?;
        for (labels, v) in rows {
            ConstCounter::new(*v).encode(enc.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        let c = ConstCounter::new(v);
        c.encode(self.0.encode_descriptor(name, &format!("{help}."), None, c.metric_type())?)
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Collector for Sources {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(a) = self.attached.get() else { return Ok(()) };
        let mut out = Out(encoder);
        if let Some(tier) = a.tier.upgrade() {
            memory(&mut out, &tier)?;
        }
        if let Some(c) = a.cluster.as_ref().and_then(Weak::upgrade) {
            cluster(&mut out, &c)?;
        }
        if let Some(d) = a.drainer.as_ref().and_then(Weak::upgrade) {
            drain(&mut out, &d)?;
        }
        Ok(())
    }
}

/// Capacity, its use by category, and the segment pool.
fn memory(out: &mut Out<'_>, tier: &MemoryTier) -> std::fmt::Result {
    let u = tier.usage();
    out.gauge("memory_capacity_bytes", "Capacity of the memory tier", u.capacity as f64)?;
    out.gauge("memory_used_bytes", "Bytes counted against the capacity (every category)", u.used as f64)?;
    let by = |c: &'static str, v: u64| (vec![("category", c)], v as f64);
    let categories = [
        by("sealed", u.sealed),
        by("in_progress", u.in_progress),
        by("pooled", u.pooled),
        by("transient", u.transient),
    ];
    out.gauges(
        "memory_category_bytes",
        "Used bytes by category: sealed shards, reserved or sealing, pooled segments, transient",
        &categories,
    )?;
    out.gauge("memory_shards", "Sealed shards held", u.shards as f64)?;
    out.gauge("memory_reservations", "Open reservations", u.reservations as f64)?;
    out.gauge("memory_pooled_bytes", "Free segments kept for reuse, recycled and pre-faulted", u.pooled as f64)?;
    out.gauge("memory_pooled_segments", "Free segments in the pool", u.pooled_segments as f64)?;
    out.gauge("memory_recycled_bytes", "Pooled segments recycled from dropped shards", u.recycled as f64)?;
    out.gauge("memory_prefaulted_bytes", "Pooled segments faulted in ahead of need", u.prefaulted as f64)?;
    out.gauge("memory_prefaulted_segments", "Pooled segments the filler made", u.prefaulted_segments as f64)?;
    out.gauge(
        "memory_prefault_target_bytes",
        "Pooled bytes the filler aims to keep (0: no filler)",
        u.prefault_target as f64,
    )?;
    out.gauge(
        "memory_prefault_pending",
        "1 while the filler has work left (a segment to fault in, or one under way)",
        f64::from(u8::from(u.prefault_pending)),
    )?;
    out.counter("memory_reserved_from_pool", "Reservations served from a pooled segment", u.reserved_from_pool)?;
    out.counter(
        "memory_reserved_fresh",
        "Reservations that created a fresh file (pages faulted by the writer)",
        u.reserved_fresh,
    )
}

/// Membership, the replicator's counters, and the backlog per peer.
fn cluster(out: &mut Out<'_>, c: &Cluster) -> std::fmt::Result {
    let (nodes, r) = c.members_and_stats();
    out.gauge("cluster_members", "Members of the cluster, this node included", nodes.len() as f64)?;
    let states = [NodeState::Unknown, NodeState::Alive, NodeState::Suspect, NodeState::Dead, NodeState::Left];
    let per_state: Vec<_> = states
        .iter()
        .map(|s| (vec![("state", state_name(*s))], nodes.iter().filter(|n| n.state == *s).count() as f64))
        .collect();
    out.gauges("cluster_nodes", "Members by state as this node sees them", &per_state)?;
    let codes: Vec<_> = nodes
        .iter()
        .map(|n| {
            let code = match n.state {
                NodeState::Unknown => 0.0,
                NodeState::Alive => 1.0,
                NodeState::Suspect => 2.0,
                NodeState::Dead => 3.0,
                NodeState::Left => 4.0,
            };
            (vec![("node", n.id.as_str())], code)
        })
        .collect();
    out.gauges("node_state", "Member state: 0 unknown, 1 alive, 2 suspect, 3 dead, 4 left", &codes)?;
    out.counter("replicated_shards", "Shards copied to peers", r.shards_sent)?;
    out.counter("replicated_bytes", "Shard bytes copied to peers, before compression and delta", r.bytes_sent)?;
    out.counter("replication_wire_bytes", "Bytes sent to peers for those copies", r.wire_bytes_sent)?;
    out.counter("replication_delta_shards", "Copies sent as deltas", r.delta_shards_sent)?;
    out.counter("replication_encoded_shards", "Copies sent encoded (compressed)", r.encoded_shards_sent)?;
    out.counter("replication_deltas_refused", "Deltas a peer refused (sent whole instead)", r.deltas_refused)?;
    out.counter("replication_failures", "Copies to peers that failed after retries", r.failures)?;
    out.counter("replication_pushes_attempted", "Replica requests started (every try)", r.pushes_attempted)?;
    out.counter(
        "replication_wire_bytes_attempted",
        "Bytes those requests carried, finished or not",
        r.wire_bytes_attempted,
    )?;
    out.gauge("replication_queued_shards", "Sealed shards waiting for the replicator", r.queued as f64)?;
    out.counter("peer_fetched_shards", "Shards restored from a peer's copy", r.shards_fetched)?;
    out.counter("peer_fetched_bytes", "Bytes of shards restored from a peer's copy", r.bytes_fetched)?;
    out.counter("rereplicated_shards", "Copies made to restore k+1 live copies", r.rereplicated)?;
    let lag = c.peer_lag();
    let rows = |f: &dyn Fn(&crate::cluster::PeerLag) -> Option<f64>| -> Vec<(Labels<'_>, f64)> {
        lag.iter().filter_map(|l| Some((vec![("peer", l.peer.as_str())], f(l)?))).collect()
    };
    out.gauges(
        "replication_pending_shards",
        "Shards sealed here and queued for a peer that it does not hold yet",
        &rows(&|l| Some(l.pending as f64)),
    )?;
    out.gauges(
        "replication_lag_seconds",
        "Age of the oldest shard queued for a peer that it does not hold yet (0: none)",
        &rows(&|l| Some(l.oldest_pending.map_or(0.0, |d| d.as_secs_f64()))),
    )?;
    out.gauges(
        "replication_last_success_timestamp_seconds",
        "When a push to the peer last succeeded (Unix time; absent before the first)",
        &rows(&|l| l.last_success.map(unix_seconds)),
    )
}

/// The drain to the persistent tier, per namespace.
fn drain(out: &mut Out<'_>, d: &Drainer) -> std::fmt::Result {
    let status = d.status();
    let waiting = d.steps_waiting();
    let ns = &status.namespaces;
    let waiting: Vec<_> = waiting.iter().map(|(n, w)| (vec![("namespace", n.as_str())], *w as f64)).collect();
    out.gauges(
        "persist_steps_waiting",
        "Complete steps newer than the last one persisted or skipped (the drain queue)",
        &waiting,
    )?;
    let counters = |f: fn(&crate::drain::NamespaceDrain) -> u64| -> Vec<(Labels<'_>, u64)> {
        ns.iter().map(|s| (vec![("namespace", s.namespace.as_str())], f(s))).collect()
    };
    out.counters("persist_uploaded_shards", "Shards uploaded from this node", &counters(|s| s.uploaded_shards))?;
    out.counters(
        "persist_uploaded_bytes",
        "Shard bytes uploaded from this node, before compression and delta",
        &counters(|s| s.uploaded_bytes),
    )?;
    out.counters("persist_stored_bytes", "What those uploads took in the store", &counters(|s| s.stored_bytes))?;
    out.counters("persist_delta_shards", "Shards stored as deltas", &counters(|s| s.delta_shards))?;
    out.counters("persist_commits", "Steps committed after this node uploaded its ranks", &counters(|s| s.commits))?;
    out.counters("persist_failures", "Failed attempts to persist", &counters(|s| s.failures))?;
    out.counters("persist_skipped_steps", "Complete steps not persisted (persist_every)", &counters(|s| s.skipped))?;
    let last: Vec<_> = ns
        .iter()
        .filter_map(|s| Some((vec![("namespace", s.namespace.as_str())], s.last_commit_unix_ms? as f64 / 1000.0)))
        .collect();
    out.gauges(
        "persist_last_commit_timestamp_seconds",
        "When this node last saw a step of the namespace committed (Unix time)",
        &last,
    )?;
    let uploading: Vec<_> = ns
        .iter()
        .map(|s| (vec![("namespace", s.namespace.as_str())], f64::from(u8::from(s.uploading.is_some()))))
        .collect();
    out.gauges("persist_uploading", "1 while a shard of the namespace is being uploaded", &uploading)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn every_counter_and_histogram_moves() {
        let m = Metrics::default();
        let ms = Duration::from_millis(3);
        m.sealed(100);
        m.reserved(ms);
        m.written(ms);
        m.seal_took(ms);
        m.replicated(ms);
        m.uploaded(ms);
        m.committed(ms);
        m.restored("peer", ms);
        m.unrestorable();
        m.node_event("n1", NodeState::Dead);
        let text = m.render();
        assert_eq!(value(&text, "tierckpt_shards_sealed_total"), 1.0);
        assert_eq!(value(&text, "tierckpt_sealed_bytes_total"), 100.0);
        assert_eq!(value(&text, "tierckpt_unrestorable_steps_total"), 1.0);
        assert_eq!(value(&text, "tierckpt_node_events_total{node=\"n1\",state=\"dead\"}"), 1.0);
        for h in ["reserve", "write", "seal", "replicate_push", "persist_upload", "persist_commit"] {
            let name = format!("tierckpt_{h}_duration_seconds");
            assert_eq!(value(&text, &format!("{name}_count")), 1.0, "{name}");
            assert!((value(&text, &format!("{name}_sum")) - 0.003).abs() < 1e-9, "{name}");
            // 3 ms falls in the 5 ms bucket, not the 2.5 ms one.
            assert_eq!(value(&text, &format!("{name}_bucket{{le=\"0.0025\"}}")), 0.0, "{name}");
            assert_eq!(value(&text, &format!("{name}_bucket{{le=\"0.005\"}}")), 1.0, "{name}");
        }
        assert_eq!(value(&text, "tierckpt_restore_duration_seconds_count{tier=\"peer\"}"), 1.0);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_collector_reads_the_memory_tier_at_scrape_time() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let tier =
            Arc::new(MemoryTier::open(tierckpt_tiers::MemoryTierConfig::new(dir.path().join("m"), 64 << 20)).unwrap());
        let m = Metrics::default();
        assert!(!m.render().contains("tierckpt_memory_capacity_bytes"), "nothing before attach");
        m.attach(&tier, None, None);
        let text = m.render();
        assert_eq!(value(&text, "tierckpt_memory_capacity_bytes"), (64u64 << 20) as f64);
        assert_eq!(value(&text, "tierckpt_memory_category_bytes{category=\"sealed\"}"), 0.0);
        assert_eq!(value(&text, "tierckpt_restore_duration_seconds_count{tier=\"memory\"}"), 0.0);
        let key = tierckpt_format::ShardKey::new("ns", 1, 0);
        let r = tier.reserve(&key, 1, 4096).unwrap();
        let text = m.render();
        assert_eq!(value(&text, "tierckpt_memory_reservations"), 1.0);
        assert!(value(&text, "tierckpt_memory_category_bytes{category=\"in_progress\"}") >= 4096.0);
        tier.abort(r.id).unwrap();
        assert_eq!(value(&m.render(), "tierckpt_memory_reservations"), 0.0);
    }
}

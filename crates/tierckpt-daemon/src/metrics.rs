//! Prometheus metrics of the daemon, served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tierckpt_proto::{MemoryUsage, NodeState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    node: String,
    state: String,
}

/// Counters and gauges, updated where things happen.
pub struct Metrics {
    registry: Registry,
    shards_sealed: Counter,
    bytes_sealed: Counter,
    replicated_shards: Counter,
    replicated_bytes: Counter,
    replication_failures: Counter,
    unrestorable_steps: Counter,
    node_events: Family<EventLabels, Counter>,
    node_state: Family<NodeLabels, Gauge>,
    memory_used: Gauge,
    memory_capacity: Gauge,
    memory_pooled: Gauge,
    memory_prefaulted: Gauge,
    memory_prefaulted_segments: Gauge,
    memory_recycled: Gauge,
    reserved_from_pool: Gauge,
    reserved_fresh: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tierckpt");
        let m = Metrics {
            registry: Registry::default(),
            shards_sealed: Counter::default(),
            bytes_sealed: Counter::default(),
            replicated_shards: Counter::default(),
            replicated_bytes: Counter::default(),
            replication_failures: Counter::default(),
            unrestorable_steps: Counter::default(),
            node_events: Family::default(),
            node_state: Family::default(),
            memory_used: Gauge::default(),
            memory_capacity: Gauge::default(),
            memory_pooled: Gauge::default(),
            memory_prefaulted: Gauge::default(),
            memory_prefaulted_segments: Gauge::default(),
            memory_recycled: Gauge::default(),
            reserved_from_pool: Gauge::default(),
            reserved_fresh: Gauge::default(),
        };
        registry.register("shards_sealed", "Shards sealed from local writers", m.shards_sealed.clone());
        registry.register("sealed_bytes", "Bytes sealed from local writers", m.bytes_sealed.clone());
        registry.register("replicated_shards", "Shards copied to peers", m.replicated_shards.clone());
        registry.register("replicated_bytes", "Bytes copied to peers", m.replicated_bytes.clone());
        registry.register(
            "replication_failures",
            "Copies to peers that failed after retries",
            m.replication_failures.clone(),
        );
        registry.register(
            "unrestorable_steps",
            "Steps found corrupt on every tier (latest skips them)",
            m.unrestorable_steps.clone(),
        );
        registry.register("node_events", "Node state changes seen by this node", m.node_events.clone());
        registry.register("node_state", "Peer state: 0 unknown, 1 alive, 2 suspect, 3 dead", m.node_state.clone());
        registry.register("memory_used_bytes", "Bytes held by the memory tier", m.memory_used.clone());
        registry.register("memory_capacity_bytes", "Capacity of the memory tier", m.memory_capacity.clone());
        registry.register(
            "memory_pooled_bytes",
            "Free segments kept for reuse, recycled and pre-faulted",
            m.memory_pooled.clone(),
        );
        registry.register(
            "memory_prefaulted_bytes",
            "Pooled segments faulted in ahead of need",
            m.memory_prefaulted.clone(),
        );
        registry.register(
            "memory_prefaulted_segments",
            "Pooled segments faulted in ahead of need",
            m.memory_prefaulted_segments.clone(),
        );
        registry.register(
            "memory_recycled_bytes",
            "Pooled segments recycled from dropped shards",
            m.memory_recycled.clone(),
        );
        registry.register(
            "memory_reserved_from_pool",
            "Reservations served from a pooled segment since start",
            m.reserved_from_pool.clone(),
        );
        registry.register(
            "memory_reserved_fresh",
            "Reservations that created a fresh file (pages faulted by the writer) since start",
            m.reserved_fresh.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A shard was sealed here.
    pub fn sealed(&self, bytes: u64) {
        self.shards_sealed.inc();
        self.bytes_sealed.inc_by(bytes);
    }

    /// A replica was sent to a peer.
    pub fn replicated(&self, bytes: u64) {
        self.replicated_shards.inc();
        self.replicated_bytes.inc_by(bytes);
    }

    /// Sending a replica failed.
    pub fn replication_failed(&self) {
        self.replication_failures.inc();
    }

    /// A step was found corrupt on every tier.
    pub fn unrestorable(&self) {
        self.unrestorable_steps.inc();
    }

    /// A peer changed state.
    pub fn node_event(&self, node: &str, state: NodeState) {
        let s = format!("{state:?}").to_lowercase();
        self.node_events.get_or_create(&EventLabels { node: node.into(), state: s }).inc();
        let code = match state {
            NodeState::Unknown => 0,
            NodeState::Alive => 1,
            NodeState::Suspect => 2,
            NodeState::Dead => 3,
            NodeState::Left => 4,
        };
        self.node_state.get_or_create(&NodeLabels { node: node.into() }).set(code);
    }

    /// The text exposition, with memory gauges taken now.
    pub fn render(&self, memory: &MemoryUsage) -> String {
        self.memory_used.set(memory.used as i64);
        self.memory_capacity.set(memory.capacity as i64);
        self.memory_pooled.set(memory.pooled as i64);
        self.memory_prefaulted.set(memory.prefaulted as i64);
        self.memory_prefaulted_segments.set(memory.prefaulted_segments as i64);
        self.memory_recycled.set(memory.recycled as i64);
        self.reserved_from_pool.set(memory.reserved_from_pool as i64);
        self.reserved_fresh.set(memory.reserved_fresh as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}

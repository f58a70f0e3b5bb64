//! What the daemons moved in the background during a run (replicas to
//! peers, fetches from them, uploads to the persistent tier), added up over
//! daemons that die and are replaced.

use anyhow::{Context, Result};
use tierckpt_client::Client;
use tierckpt_harness::daemon::LocalCluster;

/// What one daemon moved, from its status: bytes sent to peers (replicas
/// and re-replication), shards it fetched from peers, and bytes and shards
/// it uploaded to the persistent tier for one namespace.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Traffic {
    pub(super) replicated: u64,
    /// What the replicas took on the wire, after deltas and compression.
    pub(super) replicated_wire: u64,
    pub(super) fetched: u64,
    pub(super) persisted: u64,
    /// What the persisted shards took in the store, after deltas and compression.
    pub(super) persisted_stored: u64,
    pub(super) persisted_shards: u64,
}

impl Traffic {
    /// Node `i`'s counters now.
    fn read(cluster: &LocalCluster, i: usize, ns: &str) -> Result<Self> {
        let st = Client::connect(cluster.socket(i))?.status()?;
        let r = st.cluster.map(|c| c.replication).unwrap_or_default();
        let drain = st
            .persistent
            .as_ref()
            .and_then(|p| p["namespaces"].as_array()?.iter().find(|n| n["namespace"] == ns).cloned());
        let get = |k: &str| drain.as_ref().and_then(|d| d[k].as_u64()).unwrap_or(0);
        Ok(Self {
            replicated: r.bytes_sent,
            replicated_wire: r.wire_bytes_sent,
            fetched: r.shards_fetched,
            persisted: get("uploaded_bytes"),
            persisted_stored: get("stored_bytes"),
            persisted_shards: get("uploaded_shards"),
        })
    }
}

/// Adds up the daemons' counters over a run in which daemons die and are
/// replaced: each daemon's counters are read just before it is killed (a
/// new daemon starts from zero).
pub(super) struct Meter {
    ns: String,
    seen: Vec<Traffic>,
    /// What every daemon moved since the start, up to its last reading.
    pub(super) total: Traffic,
}

impl Meter {
    /// Starts counting now (what the daemons did before is left out).
    pub(super) fn start(cluster: &LocalCluster, ns: &str) -> Result<Self> {
        let seen = (0..cluster.nodes.len()).map(|i| Traffic::read(cluster, i, ns)).collect::<Result<_>>()?;
        Ok(Self { ns: ns.to_string(), seen, total: Traffic::default() })
    }

    /// Adds what node `i` did since its last reading.
    pub(super) fn read(&mut self, cluster: &LocalCluster, i: usize) -> Result<()> {
        let now = Traffic::read(cluster, i, &self.ns).with_context(|| format!("asking node {i} for its counters"))?;
        let was = std::mem::replace(&mut self.seen[i], now);
        self.total.replicated += now.replicated.saturating_sub(was.replicated);
        self.total.replicated_wire += now.replicated_wire.saturating_sub(was.replicated_wire);
        self.total.persisted_stored += now.persisted_stored.saturating_sub(was.persisted_stored);
        self.total.fetched += now.fetched.saturating_sub(was.fetched);
        self.total.persisted += now.persisted.saturating_sub(was.persisted);
        self.total.persisted_shards += now.persisted_shards.saturating_sub(was.persisted_shards);
        Ok(())
    }

    /// Adds what every node did since its last reading.
    pub(super) fn read_all(&mut self, cluster: &LocalCluster) -> Result<()> {
        (0..self.seen.len()).try_for_each(|i| self.read(cluster, i))
    }

    /// Node `i` was replaced: its new daemon counts from zero.
    pub(super) fn replaced(&mut self, i: usize) {
        self.seen[i] = Traffic::default();
    }
}

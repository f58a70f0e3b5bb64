//! What the benchmarks read from their daemon children: the counters of
//! replication and of the drain in `status`, and waits until a replica is
//! visible or a step is committed; and a node-local delete.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tierckpt_client::Client;
use tierckpt_format::ShardKey;
use tierckpt_proto::ReplicationStats;

/// The drain state of `ns` in the daemon's status (empty before its first
/// upload).
pub(crate) fn drain_state(client: &mut Client, ns: &str) -> Result<serde_json::Value> {
    let s = client.status()?;
    let p = s.persistent.context("the daemon does not drain to a persistent tier")?;
    Ok(p["namespaces"].as_array().and_then(|a| a.iter().find(|n| n["namespace"] == ns).cloned()).unwrap_or_default())
}

/// The drain counters of one namespace: what was uploaded and stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DrainCounters {
    /// Shard bytes uploaded, before compression and delta.
    pub(crate) uploaded_bytes: u64,
    /// What the store holds for them.
    pub(crate) stored_bytes: u64,
    pub(crate) delta_shards: u64,
}

impl DrainCounters {
    /// The counters of a drain state from [`drain_state`].
    pub(crate) fn of(state: &serde_json::Value) -> Self {
        let n = |f: &str| state[f].as_u64().unwrap_or(0);
        Self { uploaded_bytes: n("uploaded_bytes"), stored_bytes: n("stored_bytes"), delta_shards: n("delta_shards") }
    }

    /// What was counted since `before`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            uploaded_bytes: self.uploaded_bytes - before.uploaded_bytes,
            stored_bytes: self.stored_bytes - before.stored_bytes,
            delta_shards: self.delta_shards - before.delta_shards,
        }
    }
}

/// Polls the daemon's status until `step` of `ns` is committed; returns the
/// drain state then.
pub(crate) fn wait_committed(client: &mut Client, ns: &str, step: u64, timeout: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = drain_state(client, ns)?;
        if n["last_committed"].as_u64().is_some_and(|s| s >= step) {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            bail!("step {step} of {ns} was not committed within {timeout:?}; drain state: {n}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The replication counters of a clustered daemon.
pub(crate) fn replication(client: &mut Client) -> Result<ReplicationStats> {
    Ok(client.status()?.cluster.context("the daemon is not clustered")?.replication)
}

/// Waits until the daemon of `client` has counted more than `shards_sent`
/// replicas sent (it counts one once the peer answered, a moment after the
/// replica became visible there); returns its counters then.
pub(crate) fn wait_sent(client: &mut Client, shards_sent: u64, timeout: Duration) -> Result<ReplicationStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = replication(client)?;
        if r.failures > 0 {
            bail!("replication failed: {r:?}");
        }
        if r.shards_sent > shards_sent {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            bail!("no replica beyond {shards_sent} was counted within {timeout:?}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `key` is visible on the node of `client`: polls its steps
/// every millisecond until the shard is there or being received, then waits
/// for it to become visible without polling.
pub(crate) fn wait_replica(client: &mut Client, key: &ShardKey, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let steps = client.steps(&key.namespace)?;
        if let Some(s) = steps.iter().find(|s| s.step == key.step) {
            if s.ranks.contains(&key.rank) {
                return Ok(());
            }
            if s.in_progress.contains(&key.rank) {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                client.wait_visible(key, left).with_context(|| format!("waiting for the replica of {key}"))?;
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("no replica of {key} appeared within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Deletes a step on the node at `http_addr` alone (its peers keep theirs);
/// `bearer` is the `Authorization` header value the node wants.
pub(crate) fn delete_on_node(http_addr: &str, bearer: &str, ns: &str, step: u64) -> Result<()> {
    let mut s = TcpStream::connect(http_addr).with_context(|| format!("connecting to {http_addr}"))?;
    write!(
        s,
        "DELETE /v1/namespaces/{ns}/steps/{step}?scope=node HTTP/1.1\r\nHost: {http_addr}\r\n\
         Authorization: {bearer}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).with_context(|| format!("reading the answer of {http_addr}"))?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("deleting {ns}/step {step} on {http_addr}: {}", resp.lines().next().unwrap_or("no answer"));
    }
    Ok(())
}

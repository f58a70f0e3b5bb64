//! `tierckpt bench replicate`: a two-node cluster of daemon children; times
//! the copy of a shard to the peer (replication) and back from it (restore
//! from a peer), against a plain TCP copy of the same bytes between two
//! processes on loopback, or with `--netns` between two hosts (network
//! namespaces joined through a bridge, see the harness's `hosts`; node 0 and
//! the floor's sender on one, node 1 and the floor's receiver on the other),
//! each link capped at `--link-rate` with tc tbf if asked. Before every save but the first, a training step
//! rewrites `--changed` of the shard's chunks (outside the timed region),
//! and the bytes that went over the wire are read from node 0's counters.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tierckpt_client::Client;
use tierckpt_format::ShardKey;
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::hosts::{parse_rate, Hosts, HostsOptions};
use tierckpt_harness::stats::{gibps, median, min};

use super::floor::tcp::TcpFloor;
use super::observe::{delete_on_node, replication, wait_replica, wait_sent};
use super::state::{restore_targets, Buf, Change, FreshData, ShardArgs, State};
use crate::output;

/// Rate that `bench replicate` aims for, as a fraction of the TCP floor's,
/// for replication and for a restore from a peer.
pub const REPLICATE_TARGET_RATIO: f64 = 0.9;

/// Arguments of `bench replicate`.
#[derive(Args, Debug, Clone)]
pub struct ReplicateArgs {
    /// The shard and how it is measured.
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Directory (a tmpfs) in which the nodes' memory tiers are created, in a
    /// fresh subdirectory removed at the end.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Run node 1 and the TCP floor's receiver on a second host: two network
    /// namespaces joined by veth links through a bridge, instead of
    /// loopback (needs root, iproute2 and tc).
    #[arg(long)]
    pub netns: bool,
    /// Cap each host's link in both directions at this rate with tc tbf, as
    /// tc writes rates ("1gbit", "4gbit", "500mbit"); needs --netns.
    #[arg(long, requires = "netns", value_parser = parse_link_rate)]
    pub link_rate: Option<String>,
}

fn parse_link_rate(s: &str) -> Result<String, String> {
    parse_rate(s).map(|_| s.to_string()).map_err(|e| format!("{e:#}"))
}

/// What `bench replicate` measured. Times are seconds; rates are GiB/s of
/// shard-file bytes; ratios are a rate over the TCP floor's rate (higher is
/// better, 1.0 is as fast as a plain TCP copy). Byte counts come from the
/// daemons' replication counters.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    /// Which benchmark this is.
    pub benchmark: &'static str,
    /// Tensor bytes of the shard.
    pub bytes: u64,
    /// Bytes of the shard file (tensors plus the safetensors header): what
    /// replication, a restore from a peer and the TCP floor move.
    pub file_bytes: u64,
    /// Number of bf16 tensors.
    pub tensors: usize,
    /// Their dtype.
    pub dtype: &'static str,
    /// Nodes of the cluster.
    pub nodes: usize,
    /// Copies of each shard on other nodes (k).
    pub replication_factor: usize,
    /// Where the copies go.
    pub placement: &'static str,
    /// Measured repetitions.
    pub iters: usize,
    /// Unmeasured repetitions before them.
    pub warmup: usize,
    /// Steps each daemon keeps (its retention).
    pub keep_last: usize,
    /// Whether the nodes ran on two hosts (network namespaces through a
    /// bridge) rather than on loopback.
    pub netns: bool,
    /// Each host's link cap, as given ("1gbit"); none: uncapped.
    pub link_rate: Option<String>,
    /// The cap in GiB/s (to compare with the rates below).
    pub link_rate_gibps: Option<f64>,
    /// Where the floor's bytes went.
    pub floor: String,
    /// What each training step rewrote.
    #[serde(flatten)]
    pub fresh: FreshData,
    /// A plain TCP copy of `file_bytes` from this process to a child on
    /// 127.0.0.1 (with `netns`: from node 0's host to a child on node 1's,
    /// over the same link as replication), pre-faulted buffers at both
    /// ends: median, rate, fastest.
    pub tcp_floor_s: f64,
    /// The floor's rate.
    pub tcp_floor_gibps: f64,
    /// The floor's fastest repetition.
    pub tcp_floor_min_s: f64,
    /// Floor repetitions: `floor_reps` up front, then one before each
    /// measured replication and restore.
    pub floor_samples: usize,
    /// Median time from the save's return on node 0 (visible there) until
    /// the replica is visible on node 1.
    pub replicate_s: f64,
    /// Rate of the median replication.
    pub replicate_gibps: f64,
    /// `replicate_gibps / tcp_floor_gibps`.
    pub ratio: f64,
    /// Fastest measured replication.
    pub replicate_min_s: f64,
    /// Slowest measured replication.
    pub replicate_max_s: f64,
    /// Median bytes node 0 sent on the wire per measured replication, and
    /// their sum; shard bytes replicated (before delta and compression) over
    /// the same replications; wire over shard bytes.
    pub wire_bytes_per_replication: u64,
    /// Bytes on the wire over the measured replications.
    pub wire_bytes_sent: u64,
    /// Shard bytes replicated over them (before delta and compression).
    pub shard_bytes_replicated: u64,
    /// `wire_bytes_sent / shard_bytes_replicated`.
    pub wire_ratio: f64,
    /// Measured replicas sent as deltas, and sent encoded.
    pub delta_shards_sent: u64,
    /// Measured replicas sent encoded.
    pub encoded_shards_sent: u64,
    /// The first replication, into fresh tmpfs pages on node 1, apart from
    /// the steady state: time, rate, bytes on the wire.
    pub replicate_first_s: f64,
    /// Rate of the first replication.
    pub replicate_first_gibps: f64,
    /// Bytes on the wire for the first replication.
    pub replicate_first_wire_bytes: u64,
    /// Median `Client::save` (wait = true) on node 0, for context.
    pub save_s: f64,
    /// Median `map_unverified` on node 1 after its copy was deleted: fetch
    /// from node 0 (verified chunk by chunk), then map and populate.
    pub restore_peer_s: f64,
    /// Rate of the median restore from the peer.
    pub restore_peer_gibps: f64,
    /// `restore_peer_gibps / tcp_floor_gibps`.
    pub restore_ratio: f64,
    /// Fastest restore from the peer.
    pub restore_peer_min_s: f64,
    /// Median bytes node 1 fetched from node 0 per restore.
    pub restore_peer_fetched_bytes: u64,
    /// Median `map_unverified` on node 1 of the shard it now holds: the part
    /// of `restore_peer_s` that is not the fetch.
    pub restore_local_map_s: f64,
    /// Median `load_into` on node 1 after its copy was deleted: fetch, map,
    /// then copy into caller buffers verifying every chunk.
    pub restore_peer_load_s: f64,
    /// Its rate.
    pub restore_peer_load_gibps: f64,
    /// `restore_peer_load_gibps / tcp_floor_gibps`.
    pub restore_peer_load_ratio: f64,
    /// The target ratio.
    pub target_ratio: f64,
    /// Whether the ratio reaches the target.
    pub meets_target: bool,
    /// Whether the restore's ratio is within the target.
    pub restore_meets_target: bool,
    /// The bytes restored through node 1 were compared with the saved ones.
    pub restored_identical: bool,
    /// How the steady state was obtained.
    pub steady_state: &'static str,
}

const STEADY_STATE: &str = "before every save but the first, a training step rewrites the changed chunks \
outside the timed region; each save waits until the replica is visible on node 1 before the next one; \
after keep_last + 2 warm-up saves both nodes write into recycled segments";

/// One replication: times and what went over the wire.
#[derive(Debug, Clone, Copy)]
struct Replication {
    save_s: f64,
    replicate_s: f64,
    wire_bytes: u64,
    shard_bytes: u64,
    delta: bool,
    encoded: bool,
}

/// One restore from the peer: its time and the bytes node 1 fetched.
#[derive(Debug, Clone, Copy)]
struct Restore {
    secs: f64,
    fetched: u64,
}

/// Two nodes, k = 1, ring: node 0 writes, node 1 holds its replicas. Each
/// tier holds keep_last + 2 shards. The heartbeat timeout is long, so that
/// re-replication (only of shards older than twice the timeout) stays out.
fn start_cluster(
    a: &ReplicateArgs,
    dir: &tempfile::TempDir,
    file_bytes: u64,
    hosts: Option<&Hosts>,
) -> Result<LocalCluster> {
    let mut opts = LocalClusterOptions { nodes: 2, ..Default::default() };
    let s = &mut opts.settings;
    s.memory_tier_size = Some(((a.shard.keep_last as u64 + 2) * file_bytes).to_string());
    s.keep_last = Some(a.shard.keep_last);
    s.replication_factor = Some(1);
    s.placement = Some("ring".into());
    s.heartbeat_interval = Some("500ms".into());
    s.heartbeat_timeout = Some("60s".into());
    match hosts {
        Some(h) => {
            // The link exists only between the bench's own namespaces; the
            // floor it is measured against is plain TCP too.
            opts.settings.insecure_http = Some(true);
            LocalCluster::start_at(dir.path(), opts, h.places())
        }
        None => LocalCluster::start(dir.path(), opts),
    }
}

/// Runs `bench replicate` and returns its figures.
pub fn measure(a: &ReplicateArgs) -> Result<ReplicateReport> {
    if a.shard.iters == 0 || a.shard.floor_reps == 0 {
        bail!("--iters and --floor-reps must be at least 1");
    }
    if a.shard.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let warmup = a.shard.warmup.unwrap_or(a.shard.keep_last + 2);
    let mut state = State::new(a.shard.size, a.shard.tensors, 0, "replicate")?;
    let file_bytes = state.file_bytes();

    // With --netns: host 0 holds node 0 and the floor's sender, host 1 node
    // 1 and the floor's receiver. Dropped last (after the processes in it).
    let hosts = match a.netns {
        true => Some(
            Hosts::new(HostsOptions { hosts: 2, link_rate: a.link_rate.clone(), dns: false })
                .context("bench replicate --netns: making two hosts")?,
        ),
        false => None,
    };

    // The floor: a plain TCP copy of as many bytes (pre-faulted, random) to
    // a child process on loopback (or on host 1), `floor_reps` times up
    // front and once right before every measured replication and restore.
    let floor_src = Buf::random(file_bytes as usize, 0xF1);
    let mut floor_link = TcpFloor::start(file_bytes, hosts.as_ref())?;
    let mut floor = Vec::with_capacity(a.shard.floor_reps + 3 * a.shard.iters);
    for _ in 0..a.shard.floor_reps {
        floor.push(floor_link.rep(floor_src.bytes())?);
    }
    let mut floor_rep = || floor_link.rep(floor_src.bytes());

    let dir = tempfile::Builder::new()
        .prefix("tierckpt-bench-replicate-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
    let cluster = start_cluster(a, &dir, file_bytes, hosts.as_ref())?;
    let mut c0 = Client::connect(cluster.socket(0))?;
    let mut c1 = Client::connect(cluster.socket(1))?;
    let http1 = cluster.node(1).http_addr.clone().context("node 1 has no HTTP address")?;
    let bearer = cluster.bearer();
    // Node 1's HTTP API is reachable from host 0 only, with --netns.
    let delete_on_1 = |addr: &str, bearer: &str, ns: &str, step: u64| match &hosts {
        Some(h) => h.enter(0, || delete_on_node(addr, bearer, ns, step))?,
        None => delete_on_node(addr, bearer, ns, step),
    };
    let timeout = Duration::from_secs(600);

    // Saves on node 0, each waited for on node 1 (and counted on node 0)
    // before the next.
    let ns = "bench-replicate";
    let (mut reps, mut change) = (Vec::with_capacity(warmup + a.shard.iters), Change::default());
    let mut sent = replication(&mut c0)?;
    for step in 0..(warmup + a.shard.iters) as u64 {
        if step > 0 {
            change = state.step(a.shard.changed);
        }
        if step >= warmup as u64 {
            floor.push(floor_rep()?);
        }
        let key = ShardKey::new(ns, step, 0);
        let t0 = Instant::now();
        c0.save(&key, 1, &state.tensors(), &state.metadata, true)
            .with_context(|| format!("saving step {step} on node 0"))?;
        let t1 = Instant::now();
        wait_replica(&mut c1, &key, timeout)?;
        let replicate_s = t1.elapsed().as_secs_f64();
        let now = wait_sent(&mut c0, sent.shards_sent, timeout)?;
        reps.push(Replication {
            save_s: (t1 - t0).as_secs_f64(),
            replicate_s,
            wire_bytes: now.wire_bytes_sent - sent.wire_bytes_sent,
            shard_bytes: now.bytes_sent - sent.bytes_sent,
            delta: now.delta_shards_sent > sent.delta_shards_sent,
            encoded: now.encoded_shards_sent > sent.encoded_shards_sent,
        });
        sent = now;
    }
    let last = ShardKey::new(ns, (warmup + a.shard.iters - 1) as u64, 0);

    // Restores from the peer: node 1 drops its copy of the newest step (over
    // HTTP with `scope=node`, so node 0 keeps its copy; the segment goes to
    // node 1's pool), then a client of node 1 opens it, which makes node 1
    // fetch it from node 0 into that segment. `map_unverified` leases the
    // shard until its connection closes, and a leased shard is unlinked
    // rather than recycled when deleted: each open uses a connection of its
    // own, closed a moment before the next delete.
    let (mut peer, mut local_maps) = (Vec::new(), Vec::new());
    for _ in 0..a.shard.iters {
        floor.push(floor_rep()?);
        delete_on_1(&http1, &bearer, ns, last.step)?;
        let before = replication(&mut c1)?.bytes_fetched;
        let mut c = Client::connect(cluster.socket(1))?;
        let t = Instant::now();
        let m = c.map_unverified(&last).context("restoring from the peer (map_unverified on node 1)")?;
        let secs = t.elapsed().as_secs_f64();
        drop(m);
        peer.push(Restore { secs, fetched: replication(&mut c1)?.bytes_fetched - before });
        let t = Instant::now();
        let m = c.map_unverified(&last)?;
        local_maps.push(t.elapsed().as_secs_f64());
        drop(m);
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The same, restored into pre-faulted caller buffers with load_into.
    let names = state.names().to_vec();
    let mut dst = Buf::new(state.bytes() as usize, 0, 0x5A);
    let mut targets = restore_targets(&names, &state.lens(), &mut dst);
    let mut loads = Vec::new();
    for _ in 0..a.shard.iters {
        floor.push(floor_rep()?);
        delete_on_1(&http1, &bearer, ns, last.step)?;
        let t = Instant::now();
        c1.load_into(&last, &mut targets).context("restoring from the peer (load_into on node 1)")?;
        loads.push(t.elapsed().as_secs_f64());
    }
    let restored_identical = state.matches(&targets);
    if !restored_identical {
        bail!("the bytes restored through node 1 differ from the saved ones");
    }
    drop(targets);

    drop((c0, c1, cluster));
    floor_link.finish()?;
    drop(hosts);
    dir.close().context("removing the benchmark's memory tiers")?;
    let runs = Runs { warmup, change, reps: &reps, peer: &peer, local_maps: &local_maps, loads: &loads, floor: &floor };
    Ok(report(a, &state, runs))
}

/// What the loops measured.
struct Runs<'a> {
    warmup: usize,
    /// What the last step changed.
    change: Change,
    /// Every replication, the warm-up ones first.
    reps: &'a [Replication],
    peer: &'a [Restore],
    local_maps: &'a [f64],
    loads: &'a [f64],
    floor: &'a [f64],
}

const GIB: f64 = (1u64 << 30) as f64;

/// Where the floor's bytes go.
fn floor_label(a: &ReplicateArgs) -> String {
    match (a.netns, &a.link_rate) {
        (false, _) => "TCP copy on loopback".into(),
        (true, None) => "TCP copy between the two hosts (uncapped link)".into(),
        (true, Some(r)) => format!("TCP copy between the two hosts (link capped at {r})"),
    }
}

fn report(a: &ReplicateArgs, state: &State, runs: Runs<'_>) -> ReplicateReport {
    let file_bytes = state.file_bytes();
    let measured = &runs.reps[runs.warmup..];
    let (first, times) = (runs.reps[0], measured.iter().map(|r| r.replicate_s).collect::<Vec<_>>());
    let wire: Vec<f64> = measured.iter().map(|r| r.wire_bytes as f64).collect();
    let sum = |f: fn(&Replication) -> u64| measured.iter().map(f).sum::<u64>();
    let (wire_bytes_sent, shard_bytes_replicated) = (sum(|r| r.wire_bytes), sum(|r| r.shard_bytes));
    let peer: Vec<f64> = runs.peer.iter().map(|r| r.secs).collect();
    let fetched: Vec<f64> = runs.peer.iter().map(|r| r.fetched as f64).collect();
    let tcp_floor_s = median(runs.floor);
    let (replicate_s, restore_peer_s, restore_peer_load_s) = (median(&times), median(&peer), median(runs.loads));
    let tcp_floor_gibps = gibps(file_bytes, tcp_floor_s);
    let replicate_gibps = gibps(file_bytes, replicate_s);
    let restore_peer_gibps = gibps(file_bytes, restore_peer_s);
    let restore_peer_load_gibps = gibps(file_bytes, restore_peer_load_s);
    let ratio = replicate_gibps / tcp_floor_gibps;
    let restore_ratio = restore_peer_gibps / tcp_floor_gibps;
    ReplicateReport {
        benchmark: "replicate",
        bytes: state.bytes(),
        file_bytes,
        tensors: state.lens().len(),
        dtype: "BF16",
        nodes: 2,
        replication_factor: 1,
        placement: "ring",
        iters: a.shard.iters,
        warmup: runs.warmup,
        keep_last: a.shard.keep_last,
        netns: a.netns,
        link_rate: a.link_rate.clone(),
        link_rate_gibps: a.link_rate.as_deref().and_then(|r| parse_rate(r).ok()).map(|b| b as f64 / 8.0 / GIB),
        floor: floor_label(a),
        fresh: FreshData::new(a.shard.changed, state.chunks(), runs.change),
        tcp_floor_s,
        tcp_floor_gibps,
        tcp_floor_min_s: min(runs.floor),
        floor_samples: runs.floor.len(),
        replicate_s,
        replicate_gibps,
        ratio,
        replicate_min_s: min(&times),
        replicate_max_s: times.iter().copied().fold(0.0, f64::max),
        wire_bytes_per_replication: median(&wire) as u64,
        wire_bytes_sent,
        shard_bytes_replicated,
        wire_ratio: wire_bytes_sent as f64 / shard_bytes_replicated as f64,
        delta_shards_sent: measured.iter().filter(|r| r.delta).count() as u64,
        encoded_shards_sent: measured.iter().filter(|r| r.encoded).count() as u64,
        replicate_first_s: first.replicate_s,
        replicate_first_gibps: gibps(file_bytes, first.replicate_s),
        replicate_first_wire_bytes: first.wire_bytes,
        save_s: median(&measured.iter().map(|r| r.save_s).collect::<Vec<_>>()),
        restore_peer_s,
        restore_peer_gibps,
        restore_ratio,
        restore_peer_min_s: min(&peer),
        restore_peer_fetched_bytes: median(&fetched) as u64,
        restore_local_map_s: median(runs.local_maps),
        restore_peer_load_s,
        restore_peer_load_gibps,
        restore_peer_load_ratio: restore_peer_load_gibps / tcp_floor_gibps,
        target_ratio: REPLICATE_TARGET_RATIO,
        meets_target: ratio >= REPLICATE_TARGET_RATIO,
        restore_meets_target: restore_ratio >= REPLICATE_TARGET_RATIO,
        restored_identical: true,
        steady_state: STEADY_STATE,
    }
}

/// Prints the report as tables.
pub fn print(r: &ReplicateReport) {
    println!(
        "bench replicate: {} in {} {} tensors ({} shard file); {} nodes, k={}, {}; {} warm-up saves, then medians of {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        output::human_bytes(r.file_bytes),
        r.nodes,
        r.replication_factor,
        r.placement,
        r.warmup,
        r.iters
    );
    println!("{}", r.fresh.describe());
    if r.netns {
        let cap = match (&r.link_rate, r.link_rate_gibps) {
            (Some(rate), Some(g)) => format!("each link capped at {rate} ({g:.3} GiB/s) with tc tbf"),
            _ => "links uncapped".into(),
        };
        println!("node 1 on a second host (network namespaces through a bridge); {cap}");
    }
    let mut t = output::table(&["operation", "seconds", "GiB/s", "ratio to floor", "bytes on the wire"]);
    let row = |t: &mut comfy_table::Table, op: &str, s: f64, rate: bool, wire: Option<u64>| {
        let g = gibps(r.file_bytes, s);
        t.add_row(vec![
            op.to_string(),
            format!("{s:.4}"),
            if rate { format!("{g:.2}") } else { String::new() },
            if rate { format!("{:.3}", g / r.tcp_floor_gibps) } else { String::new() },
            wire.map(output::human_bytes).unwrap_or_default(),
        ]);
    };
    row(&mut t, &format!("{} (the floor)", r.floor), r.tcp_floor_s, true, Some(r.file_bytes));
    row(
        &mut t,
        "replicate: visible on node 0 -> visible on node 1",
        r.replicate_s,
        true,
        Some(r.wire_bytes_per_replication),
    );
    row(&mut t, "replicate: first (fresh tmpfs pages)", r.replicate_first_s, true, Some(r.replicate_first_wire_bytes));
    row(
        &mut t,
        "restore from peer: map_unverified on node 1",
        r.restore_peer_s,
        true,
        Some(r.restore_peer_fetched_bytes),
    );
    row(&mut t, "  of which local map and populate", r.restore_local_map_s, false, None);
    row(&mut t, "restore from peer: load_into on node 1", r.restore_peer_load_s, true, None);
    row(&mut t, "save on node 0 (wait), for context", r.save_s, false, None);
    println!("{t}");
    println!(
        "measured replications: {} delta, {} encoded of {}; wire / shard bytes {:.3}",
        r.delta_shards_sent, r.encoded_shards_sent, r.iters, r.wire_ratio
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target: rate at least {} of the floor -- replicate {:.3} ({}), restore from peer {:.3} ({})",
        r.target_ratio,
        r.ratio,
        verdict(r.meets_target),
        r.restore_ratio,
        verdict(r.restore_meets_target)
    );
    println!("steady state: {}", r.steady_state);
}

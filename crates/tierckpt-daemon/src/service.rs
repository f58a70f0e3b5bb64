//! The daemon's state and the handling of local requests; both APIs call it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierckpt_format::ShardKey;
use tierckpt_tiers::ErrorKind;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use tierckpt_proto::{DaemonStatus, Reply, Request, WireResult};
use tierckpt_tiers::{MemoryTier, MemoryTierConfig, ReserveOptions, Result, Tier, TierError};

use crate::peer_tier::PeerTier;
use tokio::sync::watch;

use crate::{DaemonConfig, DaemonError};

/// How long `latest` waits for seals in flight (acknowledged to a writer, not
/// yet checksummed) so that its answer includes them.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Newest failure records per namespace shown in the status.
const STATUS_FAILURES: usize = 20;

/// Shared state of a running daemon.
pub struct Daemon {
    /// This node's memory tier.
    pub tier: Arc<MemoryTier>,
    /// The settings it runs with.
    pub cfg: DaemonConfig,
    /// Membership and replication, when clustered.
    pub cluster: Option<Arc<Cluster>>,
    /// The drain to the persistent tier, when configured.
    pub drainer: Option<Arc<crate::drain::Drainer>>,
    /// Prometheus counters.
    pub metrics: Arc<Metrics>,
    /// Where reads look, fastest first: this node's memory, then the peers'
    /// memory (in a cluster), then the persistent tier (when draining).
    pub read_path: Vec<Arc<dyn Tier>>,
    /// Starts and failures recorded by supervisors.
    pub failures: crate::failures::FailureLog,
    /// The checkpoint advice: alerts, the preemption notice, health checks.
    pub advice: crate::advice::Advisor,
    /// Pinned and named steps (see [`crate::pins`]).
    pub pins: crate::pins::Pins,
    /// Steps found corrupt on every tier, which `latest` skips.
    pub unrestorable: Arc<crate::unrestorable::Unrestorable>,
    /// Whether the memory directory's tmpfs gives huge pages.
    pub huge_pages: bool,
    /// The namespaces created through the HyperPod API on this node.
    pub(crate) hyperpod_namespaces: crate::hyperpod::Configs,
    /// One permit per open connection of the HTTP and HyperPod APIs
    /// together (`http_max_connections`).
    pub(crate) http_slots: Arc<tokio::sync::Semaphore>,
    /// TLS of the HTTP API and the peer client, when `tls_cert` is set.
    pub(crate) tls: Option<Arc<crate::tls::Tls>>,
    /// Runtime of the background work (replication, drain, checksums, the
    /// HTTP API), at a lower CPU priority than the local API.
    background: tokio::runtime::Handle,
    started: Instant,
    http_addr: Option<SocketAddr>,
}

/// What one local connection holds.
#[derive(Default)]
pub struct Connection {
    /// Reservations not yet sealed, reclaimed if the connection goes away.
    pub reservations: HashSet<u64>,
    /// Shards opened for reading, released when the connection goes away.
    pub leases: Vec<ShardKey>,
    /// When each reservation was answered (the writer's copy starts).
    pub reserved_at: HashMap<u64, Instant>,
}

/// Handle on a daemon started with [`Daemon::start`].
pub struct RunningDaemon {
    /// The daemon's shared state.
    pub daemon: Arc<Daemon>,
    /// Where the local API listens.
    pub socket: PathBuf,
    /// Where the HTTP API listens, if on.
    pub http_addr: Option<SocketAddr>,
    /// Where the HyperPod API listens, if on (`hyperpod_listen`).
    pub hyperpod_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    filler: Option<tierckpt_tiers::memory::PoolFiller>,
}

impl RunningDaemon {
    /// In a cluster: hands this node's copies over and tells the members it
    /// leaves (see `Cluster::leave`); returns the shards handed over.
    pub async fn leave_cluster(&self) -> usize {
        let Some(c) = self.daemon.cluster.clone() else { return 0 };
        self.daemon.background.spawn(async move { c.leave().await }).await.unwrap_or(0)
    }

    /// Stops accepting, then waits for the servers to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        drop(self.filler);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Removes a file when dropped, unless taken: the socket of a start that
/// failed after binding it.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How long a local reservation that does not fit waits for seals under way
/// (a trainer saving faster than the daemon checksums) before it is refused.
const SEAL_WAIT: Duration = Duration::from_secs(60);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TierError::Unavailable(format!("daemon worker failed: {e}")))?
}

impl Daemon {
    /// Opens the memory tier and binds both APIs; everything runs on the
    /// current runtime.
    pub async fn start(cfg: DaemonConfig) -> std::result::Result<RunningDaemon, DaemonError> {
        Self::start_with_background(cfg, tokio::runtime::Handle::current()).await
    }

    /// As [`Daemon::start`], with the background work (replication, drain,
    /// seal checksums, the HTTP API) on `background` (see
    /// [`background_runtime`]).
    pub async fn start_with_background(
        cfg: DaemonConfig,
        background: tokio::runtime::Handle,
    ) -> std::result::Result<RunningDaemon, DaemonError> {
        crate::advice::check_notice(&cfg.advice).await?;
        let mount_size = cfg.capacity + (256 << 20);
        let pages = if cfg.mount_huge_tmpfs {
            Some(crate::hugepages::ensure_huge_tmpfs(&cfg.memory_dir, mount_size)?)
        } else if cfg.mount_huge_tmpfs_by_default {
            crate::hugepages::huge_tmpfs_where_harmless(&cfg.memory_dir, mount_size)
        } else {
            crate::hugepages::inspect(&cfg.memory_dir)
        };
        let huge_pages = pages.as_ref().is_some_and(crate::hugepages::PageInfo::huge_pages);
        if huge_pages {
            tracing::info!(dir = %cfg.memory_dir.display(), "the memory tier has huge pages (a tmpfs with huge=)");
        } else {
            tracing::info!(
                dir = %cfg.memory_dir.display(),
                "the memory tier is on 4 KiB pages: each restore builds ~30 ms/GiB of page tables; \
                 put memory_dir on a tmpfs mounted with huge=within_size (or set mount_huge_tmpfs as root)"
            );
        }
        let mut tcfg = MemoryTierConfig::new(&cfg.memory_dir, cfg.capacity);
        tcfg.keep_last = cfg.keep_last;
        tcfg.access = cfg.access;
        tcfg.prefault_share = cfg.prefault_share;
        let pins = crate::pins::Pins::open(&cfg.memory_dir, cfg.access);
        tcfg.pinned = pins.steps();
        let daemon_access = cfg.access;
        let tier = Arc::new(blocking(move || MemoryTier::open(tcfg)).await?);
        // Pre-faulting yields to training as the background work does.
        let filler = if cfg.prefault_share > 0.0 {
            Some(tier.start_filler(cfg.background_nice).map_err(|e| DaemonError::io("starting the pool filler", e))?)
        } else {
            None
        };
        // The port first: a daemon that cannot have it leaves no socket file.
        let http = match cfg.http_addr {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| DaemonError::io(format!("binding the HTTP API to {a}"), e))?,
            ),
            None => None,
        };
        let hyperpod = match cfg.hyperpod_listen {
            Some(a) => {
                if !a.ip().is_loopback() {
                    tracing::warn!(addr = %a, "the HyperPod API takes no token: anyone who reaches {a} may write and \
                        delete its checkpoints");
                }
                Some(
                    tokio::net::TcpListener::bind(a).await.map_err(|e| {
                        DaemonError::io(format!("binding the HyperPod API to {a} (hyperpod_listen)"), e)
                    })?,
                )
            }
            None => None,
        };
        let listener = crate::uds::bind(&cfg.socket, cfg.socket_mode, cfg.socket_group)?;
        let mut unbind = RemoveOnDrop(Some(cfg.socket.clone()));
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let hyperpod_addr = hyperpod.as_ref().and_then(|l| l.local_addr().ok());
        let socket = cfg.socket.clone();
        let (stop, stopped) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let tls = cfg.tls.clone().map(crate::tls::Tls::load).transpose()?;
        let (cluster, drainer) = {
            let _bg = background.enter();
            let cluster = cfg.cluster.clone().map(|c| {
                let token = cfg.peer_token.clone().or_else(|| cfg.token.clone());
                let peers = crate::peer::PeerClient::new(token, tls.clone());
                Cluster::start(c, tier.clone(), peers, metrics.clone(), stopped.clone())
            });
            let node = cfg.cluster.as_ref().map_or("node".to_string(), |c| c.node_id.clone());
            let drainer = match cfg.persist.clone() {
                Some(p) => {
                    let (t, c, m) = (tier.clone(), cluster.clone(), metrics.clone());
                    Some(crate::drain::Drainer::start(p, &node, t, c, m, stopped.clone())?)
                }
                None => None,
            };
            (cluster, drainer)
        };
        metrics.attach(&tier, cluster.as_ref(), drainer.as_ref());
        // Ready means the cluster view is there: a trainer that asks at once
        // (a replacement node restoring) sees which peers hold what. Each
        // probe is bounded, so unreachable peers only delay the start.
        if let Some(c) = cluster.clone() {
            let _ = background
                .spawn(async move {
                    if let Some(source) = c.cfg.discover.clone() {
                        c.discover_once(&source).await;
                    }
                    c.refresh_all().await
                })
                .await;
        }
        let mut read_path: Vec<Arc<dyn Tier>> = vec![tier.clone()];
        read_path.extend(cluster.iter().map(|c| Arc::new(PeerTier::new(c.clone())) as Arc<dyn Tier>));
        read_path.extend(drainer.iter().map(|d| d.store.clone() as Arc<dyn Tier>));
        let failures = crate::failures::FailureLog::new(&cfg.memory_dir, daemon_access);
        let unrestorable = Arc::new(crate::unrestorable::Unrestorable::open(&cfg.memory_dir, daemon_access));
        let hyperpod_namespaces = crate::hyperpod::Configs::open(&cfg.memory_dir, daemon_access);
        let daemon = Arc::new(Daemon {
            advice: crate::advice::Advisor::new(&cfg.advice),
            failures,
            pins,
            unrestorable,
            huge_pages,
            hyperpod_namespaces,
            http_slots: Arc::new(tokio::sync::Semaphore::new(cfg.http_max_connections)),
            tls: tls.clone(),
            background: background.clone(),
            tier,
            cfg,
            cluster,
            drainer,
            metrics,
            read_path,
            started: Instant::now(),
            http_addr,
        });
        unbind.0 = None;
        let mut tasks = vec![tokio::spawn(crate::uds::serve(daemon.clone(), listener, stopped.clone()))];
        {
            let _bg = background.enter();
            tasks.extend(crate::advice::start(daemon.clone(), stopped.clone()));
        }
        if let Some(l) = hyperpod {
            tasks.push(background.spawn(crate::hyperpod::serve(daemon.clone(), l, stopped.clone())));
        }
        if let Some(t) = tls {
            tasks.push(background.spawn(t.watch(stopped.clone())));
        }
        if let Some(l) = http {
            tasks.push(background.spawn(crate::http::serve(daemon.clone(), l, stopped)));
        }
        tracing::info!(socket = %socket.display(), http = ?http_addr, hyperpod = ?hyperpod_addr,
            capacity = daemon.cfg.capacity, "daemon ready");
        Ok(RunningDaemon { daemon, socket, http_addr, hyperpod_addr, stop, tasks, filler })
    }

    /// Refuses a step a client (not a peer) may not write: 2^53 and above,
    /// or more than `max_step_advance` above the newest step of `ns` held
    /// here (no bound while it holds none).
    pub fn check_client_step(&self, ns: &str, step: u64) -> Result<()> {
        if step >= crate::config::STEP_LIMIT {
            return Err(TierError::InvalidArgument(format!(
                "step {step} of {ns} is 2^53 or above: steps must stay below {} (exact in JSON and Python floats)",
                crate::config::STEP_LIMIT
            )));
        }
        let bound = self.cfg.max_step_advance;
        if bound == 0 {
            return Ok(());
        }
        // An invalid namespace is for the reservation to refuse, by name.
        let newest = self.tier.steps(ns).ok().and_then(|s| s.iter().map(|s| s.step).max());
        match newest {
            Some(n) if step > n.saturating_add(bound) => Err(TierError::InvalidArgument(format!(
                "step {step} of {ns} is more than max_step_advance {bound} above its newest step held here, {n}; \
                 delete the namespace to start it over, or raise max_step_advance (0: unbounded)"
            ))),
            _ => Ok(()),
        }
    }

    /// What `tierckpt status` shows.
    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            root: self.cfg.memory_dir.display().to_string(),
            socket: self.cfg.socket.display().to_string(),
            http_addr: self.http_addr.map(|a| a.to_string()),
            uptime_s: self.started.elapsed().as_secs_f64(),
            memory: self.tier.usage(),
            namespaces: self.namespaces(),
            cluster: self.cluster.as_ref().map(|c| c.status()),
            persistent: self.drainer.as_ref().map(|d| serde_json::to_value(d.status()).unwrap_or_default()),
            failures: self.failures.recent(STATUS_FAILURES),
            unrestorable: self.unrestorable.all(),
            huge_pages: self.huge_pages,
            advice: self.advice.status(),
        }
    }

    /// Seals a reservation: moves it into place now, checksums it on a worker
    /// thread, and with `wait` returns once it is visible.
    /// Once visible, a shard written on this node is queued for replication.
    pub async fn seal(&self, id: u64, wait: bool) -> Result<()> {
        let job = self.tier.begin_seal(id)?;
        let tier = self.tier.clone();
        let started = Instant::now();
        let work = self.background.spawn_blocking(move || tier.finish_seal(job));
        let (cluster, metrics, drainer) = (self.cluster.clone(), self.metrics.clone(), self.drainer.clone());
        let unrestorable = self.unrestorable.clone();
        let done = async move {
            let m = work.await.map_err(|e| TierError::Unavailable(format!("seal worker failed: {e}")))??;
            metrics.seal_took(started.elapsed());
            metrics.sealed(m.file_len);
            unrestorable.clear(&m.key.namespace, m.key.step);
            if let Some(c) = cluster {
                c.enqueue(m.key.clone());
            }
            if let Some(d) = drainer {
                d.poke();
            }
            Ok::<(), TierError>(())
        };
        if wait {
            done.await
        } else {
            self.background.spawn(done);
            Ok(())
        }
    }

    /// Newest restorable step: complete here, across live nodes in a
    /// cluster, or committed in the persistent tier, and not found corrupt
    /// on every tier.
    pub async fn latest(&self, ns: &str) -> Result<Option<u64>> {
        tierckpt_format::names::validate_namespace(ns)?;
        let skip = Arc::new(self.unrestorable.of(ns));
        let (t, n, s) = (self.tier.clone(), ns.to_string(), skip.clone());
        let local = blocking(move || {
            t.settle(&n, SETTLE_TIMEOUT);
            Ok(t.steps(&n)?.iter().rev().find(|st| st.complete && !s.contains(&st.step)).map(|st| st.step))
        })
        .await?;
        let memory = match &self.cluster {
            Some(c) => c.latest(ns, &skip).await.max(local),
            None => local,
        };
        let persisted = match &self.drainer {
            Some(d) => match d.store.latest_committed_except(ns, &skip).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "the persistent tier did not answer; latest counts memory only");
                    None
                }
            },
            None => None,
        };
        Ok(memory.max(persisted))
    }

    /// Deletes a step (or with `None` a namespace) here, and with
    /// `everywhere` on every reachable peer too; returns (shards, bytes).
    pub async fn delete(&self, ns: &str, step: Option<u64>, everywhere: bool) -> Result<(u64, u64)> {
        tierckpt_format::names::validate_namespace(ns)?;
        let (t, n) = (self.tier.clone(), ns.to_string());
        let here = blocking(move || {
            t.settle(&n, SETTLE_TIMEOUT);
            match step {
                Some(s) => t.delete_step(&n, s),
                None => t.delete_namespace(&n),
            }
        })
        .await;
        if here.is_ok() {
            self.forget_pins(ns, step);
        }
        let cluster = self.cluster.as_ref().filter(|_| everywhere);
        let Some(c) = cluster else { return here };
        let mut total = match here {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e),
        };
        let what = step.map_or(format!("namespace {ns}"), |s| format!("{ns}/step {s}"));
        let mut missed = Vec::new();
        for (node, r) in c.delete_on_peers(ns, step).await {
            match r {
                Ok((shards, bytes)) => total = (total.0 + shards, total.1 + bytes),
                Err(e) => missed.push(format!("{node} ({e})")),
            }
        }
        if !missed.is_empty() {
            return Err(TierError::Unavailable(format!(
                "deleted {} shards ({} bytes) of {what}, but these nodes may still hold some: {}; \
                 delete again once they are back",
                total.0,
                total.1,
                missed.join(", ")
            )));
        }
        if total.0 == 0 {
            return Err(TierError::NotFound(format!("{what} on any node")));
        }
        Ok(total)
    }

    /// Path and manifest of a shard held here, copying it in first from the
    /// fastest tier that has a verified copy: the read path walks
    /// [`Daemon::read_path`] (this node's memory, the peers' memory, the
    /// persistent tier), and every copy is verified chunk by chunk on the way in.
    pub async fn locate(&self, key: &ShardKey) -> Result<(PathBuf, Arc<tierckpt_format::Manifest>)> {
        let mut errors: Vec<(&str, TierError)> = Vec::new();
        for (i, tier) in self.read_path.iter().enumerate() {
            let started = Instant::now();
            // Copies from elsewhere run on the background runtime, where the
            // connections to peers and stores live: receiving on this one
            // handed every piece across runtimes, which cost 0.1-0.15 s per
            // GiB (bench replicate, restore from a peer, 2 vCPUs).
            let copied = match i {
                0 => tier.copy_to_memory(key, &self.tier).await,
                _ => {
                    let (tier, key, memory) = (tier.clone(), key.clone(), self.tier.clone());
                    let copy = self.background.spawn(async move { tier.copy_to_memory(&key, &memory).await });
                    copy.await.unwrap_or_else(|e| Err(TierError::Unavailable(format!("copy worker failed: {e}"))))
                }
            };
            match copied {
                Ok(()) => {
                    self.metrics.restored(tier.name(), started.elapsed());
                    return self.tier.locate(key);
                }
                // This node's own copy is there but unusable: say so, do not hide it.
                Err(e) if i == 0 && e.kind() != ErrorKind::NotFound => return Err(e),
                Err(e) => errors.push((tier.name(), e)),
            }
        }
        if errors.len() == 1 {
            return Err(errors.remove(0).1);
        }
        let corrupt = errors.last().is_some_and(|(_, e)| e.kind() == ErrorKind::Corrupt);
        let said: Vec<String> = errors.iter().map(|(name, e)| format!("{name}: {e}")).collect();
        let message = format!("no tier has a verified copy of shard {key}: {}", said.join("; "));
        let answered = errors.iter().all(|(_, e)| matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Corrupt));
        if corrupt && answered && self.unrestorable.mark(&key.namespace, key.step) {
            self.metrics.unrestorable();
            tracing::error!(namespace = %key.namespace, step = key.step, %message,
                "a step is corrupt on every tier: latest now skips it");
        }
        Err(match corrupt {
            true => TierError::Remote { kind: ErrorKind::Corrupt, message },
            false => TierError::NotFound(message),
        })
    }

    /// Handles one local request for the connection `conn`.
    pub async fn handle(&self, req: Request, conn: &mut Connection) -> WireResult {
        self.handle_inner(req, conn).await.map_err(|e| e.to_wire())
    }

    /// Gives back what a closed connection still held: unsealed reservations
    /// (their segments are recycled) and leases.
    pub fn close(&self, conn: Connection) {
        for id in conn.reservations {
            match self.tier.abort(id) {
                Ok(()) => {
                    tracing::info!(reservation = id, "reclaimed the segment of a client that left before sealing")
                }
                Err(e) => tracing::debug!(reservation = id, error = %e, "reclaim"),
            }
        }
        for key in conn.leases {
            self.tier.release(&key);
        }
    }

    async fn handle_inner(&self, req: Request, conn: &mut Connection) -> Result<Reply> {
        let owned = &mut conn.reservations;
        let tier = &self.tier;
        let take = |owned: &mut HashSet<u64>, id: u64| {
            if owned.remove(&id) {
                Ok(())
            } else {
                Err(TierError::NotFound(format!("reservation {id} is not held by this connection")))
            }
        };
        Ok(match req {
            Request::Reserve { namespace, step, rank, world_size, len, segment } => {
                self.check_client_step(&namespace, step)?;
                let key = ShardKey::new(namespace, step, rank);
                let opts = ReserveOptions { segment: segment.map(PathBuf::from), wait_for_seals: SEAL_WAIT };
                let t = tier.clone();
                let started = Instant::now();
                let r = blocking(move || t.reserve_with(&key, world_size, len, &opts)).await?;
                self.metrics.reserved(started.elapsed());
                owned.insert(r.id);
                conn.reserved_at.insert(r.id, Instant::now());
                Reply::Reserved { id: r.id, path: r.path.display().to_string(), len: r.len }
            }
            Request::Prepare { len } => {
                let (path, len) = tier.prepare(len)?;
                Reply::Prepared { path: path.display().to_string(), len }
            }
            Request::Seal { id, wait } => {
                take(owned, id)?;
                if let Some(at) = conn.reserved_at.remove(&id) {
                    self.metrics.written(at.elapsed());
                }
                self.seal(id, wait).await?;
                Reply::Done
            }
            Request::Abort { id } => {
                take(owned, id)?;
                conn.reserved_at.remove(&id);
                tier.abort(id)?;
                Reply::Done
            }
            Request::WaitVisible { namespace, step, rank, timeout_ms } => {
                let t = tier.clone();
                let key = ShardKey::new(namespace, step, rank);
                let timeout = Duration::from_millis(timeout_ms.min(3_600_000));
                blocking(move || t.wait_visible(&key, timeout)).await?;
                Reply::Done
            }
            Request::Open { namespace, step, rank } => {
                let key = ShardKey::new(namespace, step, rank);
                self.locate(&key).await?;
                let (path, m) = tier.lease(&key)?;
                conn.leases.push(key);
                Reply::Opened { path: path.display().to_string(), manifest: (*m).clone() }
            }
            Request::ReportCorrupt { namespace, step, rank } => {
                let key = ShardKey::new(namespace, step, rank);
                let t = tier.clone();
                match blocking(move || t.quarantine_if_corrupt(&key)).await {
                    Ok(()) | Err(TierError::Corrupt(_)) => Reply::Done,
                    Err(e) if e.kind() == ErrorKind::NotFound => Reply::Done,
                    Err(e) => return Err(e),
                }
            }
            Request::Release { namespace, step, rank } => {
                let key = ShardKey::new(namespace, step, rank);
                let i = conn
                    .leases
                    .iter()
                    .position(|k| *k == key)
                    .ok_or_else(|| TierError::NotFound(format!("this connection holds no lease on {key}")))?;
                tier.release(&conn.leases.swap_remove(i));
                Reply::Done
            }
            Request::Latest { namespace } => Reply::Latest { step: self.latest(&namespace).await? },
            Request::ListNamespaces {} => Reply::Namespaces { namespaces: self.namespaces() },
            Request::ListSteps { namespace } => Reply::Steps { steps: tier.steps(&namespace)? },
            Request::DeleteStep { namespace, step } => {
                let (shards, bytes) = self.delete(&namespace, Some(step), true).await?;
                Reply::Deleted { shards, bytes }
            }
            Request::DeleteNamespace { namespace } => {
                let (shards, bytes) = self.delete(&namespace, None, true).await?;
                Reply::Deleted { shards, bytes }
            }
            Request::DiscardIncompleteAfter { namespace, step } => {
                let t = tier.clone();
                let (shards, bytes) = blocking(move || {
                    t.settle(&namespace, SETTLE_TIMEOUT);
                    t.discard_incomplete_after(&namespace, step)
                })
                .await?;
                Reply::Deleted { shards, bytes }
            }
            Request::Status {} => Reply::Status(Box::new(self.status())),
            Request::RecordFailure { namespace, record } => {
                self.failures.record(&namespace, &record)?;
                tracing::info!(namespace = %namespace, kind = ?record.kind, step = ?record.step, restart = record.restart, detail = %record.detail, "job event recorded");
                Reply::Done
            }
            Request::Failures { namespace } => Reply::Failures { records: self.failures.read(&namespace)? },
            Request::Advice { namespace } => Reply::Advice(self.advice_for(&namespace)?),
            Request::Pin { namespace, step, name, node_only } => {
                let (pin, not_reached) = self.pin(&namespace, step, name, node_only).await?;
                Reply::Pinned { pin, not_reached }
            }
            Request::Unpin { namespace, step, name } => {
                let (pin, not_reached) = self.unpin(&namespace, step, name).await?;
                Reply::Pinned { pin, not_reached }
            }
            Request::Pins { namespace } => Reply::Pins { pins: self.list_pins(&namespace).await? },
            Request::DeclareComplete { namespace, step } => {
                let t = tier.clone();
                blocking(move || t.declare_complete(&namespace, step)).await?;
                Reply::Done
            }
        })
    }
}

/// A runtime for a daemon's background work whose threads run at nice
/// `nice` (on Linux, nice is per thread): replication, drain and checksums
/// then take the cores training leaves idle. `nice` 0 leaves them as they are.
pub fn background_runtime(nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tierckpt-bg")
        .on_thread_start(move || {
            if nice > 0 {
                // SAFETY: gettid and setpriority on the calling thread only.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, nice);
                }
            }
        })
        .enable_all()
        .build()
}

//! Rust client of the node daemon `tierckptd`.
//!
//! Saving is one copy: the client reserves a segment in the daemon's memory
//! tier, maps it, writes the safetensors header and the tensor bytes straight
//! into it, and seals it; the daemon checksums, indexes and publishes it off
//! the caller's thread. Mappings of recycled segments are cached, so a save in
//! steady state costs a plain memcpy. Loading maps the shard and copies it
//! into caller buffers while verifying its checksums, or hands out the
//! verified mapping itself.

mod copy;
mod error;
pub mod peer;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::Error;
use memmap2::{Mmap, MmapMut, MmapOptions};
use tierckpt_format::{
    copy_verified, parse_shard, verify_chunks, CopyTarget, Dtype, Manifest, ShardKey, ShardLayout, ShardView,
    TensorSpec,
};
pub use tierckpt_proto::PinInfo;
use tierckpt_proto::{DaemonStatus, FailureRecord, NamespaceSummary, Reply, Request, WireResult};
pub use tierckpt_proto::{ErrorKind, StepSummary};

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/dev/shm/tierckpt/daemon.sock";

/// `TIERCKPT_SOCKET`, or the default socket.
pub fn default_socket() -> PathBuf {
    std::env::var_os("TIERCKPT_SOCKET").map_or_else(|| DEFAULT_SOCKET.into(), PathBuf::from)
}

/// A tensor to save: its bytes are little-endian, C-contiguous.
#[derive(Debug, Clone, Copy)]
pub struct TensorData<'a> {
    /// The tensor's name in the shard.
    pub name: &'a str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: &'a [usize],
    /// Its bytes: exactly the element count times the element size.
    pub data: &'a [u8],
}

/// How long each phase of a save took, as the caller saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveTiming {
    /// Bytes of the shard file.
    pub bytes: u64,
    /// Seconds to reserve and map the segment.
    pub reserve_s: f64,
    /// Seconds to copy the tensors into it.
    pub copy_s: f64,
    /// Seconds to seal it (and, when waited for, until it was visible).
    pub seal_s: f64,
}

impl SaveTiming {
    /// Time the caller was blocked.
    pub fn total_s(&self) -> f64 {
        self.reserve_s + self.copy_s + self.seal_s
    }
}

struct CachedMap {
    dev: u64,
    ino: u64,
    file: File,
    map: MmapMut,
}

/// Writable mappings of segments this client wrote before. The daemon
/// recycles segments, so the next save of the same size usually lands in a
/// segment whose pages are already mapped here.
struct SegmentCache {
    entries: Vec<CachedMap>,
    max: usize,
}

impl SegmentCache {
    fn take(&mut self, file: File, len: usize, path: &Path) -> Result<(CachedMap, bool)> {
        // Mappings of deleted segments would pin their memory: drop them.
        self.entries.retain(|e| e.file.metadata().is_ok_and(|m| m.nlink() > 0));
        let meta = file.metadata().map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let (dev, ino) = (meta.dev(), meta.ino());
        if let Some(i) = self.entries.iter().position(|e| e.dev == dev && e.ino == ino) {
            let e = self.entries.swap_remove(i);
            if e.map.len() == len {
                return Ok((e, false));
            }
        }
        // SAFETY: the segment is reserved for this client until it seals or aborts.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        Ok((CachedMap { dev, ino, file, map }, true))
    }

    fn put_back(&mut self, e: CachedMap) {
        if self.entries.len() >= self.max {
            self.entries.remove(0);
        }
        self.entries.push(e);
    }
}

/// A connection to a node daemon's local API.
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
    cache: SegmentCache,
    /// The segment `prepare` set aside, and the shard length it is for.
    prepared: Option<(PathBuf, u64)>,
}

fn unexpected(r: Reply) -> Error {
    Error::remote(ErrorKind::Internal, format!("unexpected reply from the daemon: {r:?}"))
}

impl Client {
    /// Connects to the daemon at `socket`.
    pub fn connect(socket: impl AsRef<Path>) -> Result<Self> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket).map_err(|e| {
            Error::Unavailable(format!(
                "no daemon at {} ({e}); start one with `tierckptd` or set TIERCKPT_SOCKET",
                socket.display()
            ))
        })?;
        peer::check_daemon(&stream, &socket)?;
        Ok(Self { stream, socket, cache: SegmentCache { entries: Vec::new(), max: 16 }, prepared: None })
    }

    /// Connects to [`default_socket`].
    pub fn connect_default() -> Result<Self> {
        Self::connect(default_socket())
    }

    /// The daemon's socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        let lost = |e: std::io::Error| Error::Unavailable(format!("lost the daemon at {}: {e}", self.socket.display()));
        tierckpt_proto::write_frame(&mut self.stream, req).map_err(lost)?;
        let frame = tierckpt_proto::read_frame(&mut self.stream)
            .map_err(lost)?
            .ok_or_else(|| lost(std::io::ErrorKind::UnexpectedEof.into()))?;
        let r: WireResult = serde_json::from_slice(&frame)
            .map_err(|e| Error::remote(ErrorKind::Internal, format!("unreadable reply from the daemon: {e}")))?;
        r.map_err(Error::from)
    }

    fn done(&mut self, req: &Request) -> Result<()> {
        match self.call(req)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Reserves a segment for `key` and maps it; fill it through the returned
    /// [`PendingShard`], then seal it. Dropping it unsealed gives it back.
    pub fn begin_save(
        &mut self,
        key: &ShardKey,
        world_size: u32,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> Result<PendingShard<'_>> {
        let layout = ShardLayout::new(tensors, metadata)?;
        let req = Request::Reserve {
            namespace: key.namespace.clone(),
            step: key.step,
            rank: key.rank,
            world_size,
            len: layout.file_len,
            segment: self
                .prepared
                .take()
                .filter(|(_, len)| *len == layout.file_len)
                .map(|(path, _)| path.display().to_string()),
        };
        let (id, path) = match self.call(&req)? {
            Reply::Reserved { id, path, .. } => (id, PathBuf::from(path)),
            r => return Err(unexpected(r)),
        };
        let mapped = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))
            .and_then(|f| self.cache.take(f, layout.file_len as usize, &path));
        let (mut seg, fresh) = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = self.done(&Request::Abort { id });
                return Err(e);
            }
        };
        seg.map[..layout.header.len()].copy_from_slice(&layout.header);
        Ok(PendingShard { client: self, id, layout, seg: Some(seg), fresh })
    }

    /// Gets the next save of a shard with these tensors and metadata ready:
    /// the daemon sets a free segment of its size aside, and this client maps
    /// it and faults it in now, page tables included, so that the save then
    /// copies at memory speed. A hint: an error (no room to set one aside)
    /// changes nothing, and the save works without it. Returns the segment's file.
    pub fn prepare(&mut self, tensors: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Result<PathBuf> {
        let layout = ShardLayout::new(tensors, metadata)?;
        let len = layout.file_len;
        let path = match self.call(&Request::Prepare { len })? {
            Reply::Prepared { path, .. } => PathBuf::from(path),
            r => return Err(unexpected(r)),
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (seg, _) = self.cache.take(f, len as usize, &path)?;
        copy::populate_parallel(&seg.map, true);
        self.cache.put_back(seg);
        self.prepared = Some((path.clone(), len));
        Ok(path)
    }

    /// Saves tensors and metadata as the shard `key`. Returns once the bytes
    /// are in daemon memory; with `wait`, once the shard is also visible.
    pub fn save(
        &mut self,
        key: &ShardKey,
        world_size: u32,
        tensors: &[TensorData<'_>],
        metadata: &BTreeMap<String, String>,
        wait: bool,
    ) -> Result<SaveTiming> {
        let t0 = Instant::now();
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|t| TensorSpec { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec() })
            .collect();
        let mut pending = self.begin_save(key, world_size, &specs, metadata)?;
        let t1 = Instant::now();
        pending.write_tensors(tensors)?;
        let t2 = Instant::now();
        let bytes = pending.layout.file_len;
        pending.seal(wait)?;
        let t3 = Instant::now();
        Ok(SaveTiming {
            bytes,
            reserve_s: (t1 - t0).as_secs_f64(),
            copy_s: (t2 - t1).as_secs_f64(),
            seal_s: (t3 - t2).as_secs_f64(),
        })
    }

    /// Waits until `key` is visible, or its seal failed.
    pub fn wait_visible(&mut self, key: &ShardKey, timeout: Duration) -> Result<()> {
        self.done(&Request::WaitVisible {
            namespace: key.namespace.clone(),
            step: key.step,
            rank: key.rank,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Newest step whose every rank is visible.
    pub fn latest(&mut self, namespace: &str) -> Result<Option<u64>> {
        match self.call(&Request::Latest { namespace: namespace.into() })? {
            Reply::Latest { step } => Ok(step),
            r => Err(unexpected(r)),
        }
    }

    /// Maps a shard read-only without verifying it (see [`Client::open`]).
    /// The shard stays leased (never recycled) until this connection closes.
    pub fn map_unverified(&mut self, key: &ShardKey) -> Result<(PathBuf, Manifest, Mmap)> {
        self.map_shard(key, true)
    }

    fn release(&mut self, key: &ShardKey) -> Result<()> {
        self.done(&Request::Release { namespace: key.namespace.clone(), step: key.step, rank: key.rank })
    }

    fn map_shard(&mut self, key: &ShardKey, populate: bool) -> Result<(PathBuf, Manifest, Mmap)> {
        let req = Request::Open { namespace: key.namespace.clone(), step: key.step, rank: key.rank };
        let (path, manifest) = match self.call(&req)? {
            Reply::Opened { path, manifest } => (PathBuf::from(path), manifest),
            r => return Err(unexpected(r)),
        };
        let file = File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: sealed segments are not written again; what is read is verified.
        let map = unsafe { MmapOptions::new().map(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        if populate {
            copy::populate_parallel(&map, false);
        }
        Ok((path, manifest, map))
    }

    /// Maps a shard and verifies every chunk: zero-copy access to its tensors.
    pub fn open(&mut self, key: &ShardKey) -> Result<MappedShard> {
        let (path, manifest, map) = self.map_unverified(key)?;
        let label = path.display().to_string();
        verify_chunks(&map, &manifest, &label)?;
        let view = parse_shard(&map, &label)?;
        Ok(MappedShard { manifest, view, map })
    }

    /// Copies the named tensors of a shard into caller buffers, verifying
    /// every chunk of the shard in the same pass. Each buffer must have the
    /// tensor's exact byte length. If this node's copy is corrupt, the daemon
    /// drops it and the load is tried once more from the next tier (a peer,
    /// then persistent storage). Returns the shard's layout and metadata.
    pub fn load_into(&mut self, key: &ShardKey, targets: &mut [(&str, &mut [u8])]) -> Result<(Manifest, ShardView)> {
        match self.load_once(key, targets) {
            // This node's copy is bad: the daemon drops it, and the next try
            // gets another copy (a peer's, or the persistent tier's).
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                self.done(&Request::ReportCorrupt {
                    namespace: key.namespace.clone(),
                    step: key.step,
                    rank: key.rank,
                })?;
                self.load_once(key, targets).map_err(|again| match again.kind() {
                    ErrorKind::NotFound => {
                        Error::remote(ErrorKind::Corrupt, format!("{e}; and no other copy: {again}"))
                    }
                    _ => again,
                })
            }
            r => r,
        }
    }

    fn load_once(&mut self, key: &ShardKey, targets: &mut [(&str, &mut [u8])]) -> Result<(Manifest, ShardView)> {
        // Not prefaulted: the copy workers fault pages in themselves, 16 at a time.
        let (path, manifest, map) = self.map_shard(key, false)?;
        let result = Self::copy_out(key, &path, &manifest, &map, targets);
        if map.len() >= 64 << 20 {
            // Unmapping a large mapping takes tens of ms; not on the caller's time.
            std::thread::spawn(move || drop(map));
        }
        self.release(key)?;
        let view = result?;
        Ok((manifest, view))
    }

    fn copy_out(
        key: &ShardKey,
        path: &Path,
        manifest: &Manifest,
        map: &[u8],
        targets: &mut [(&str, &mut [u8])],
    ) -> Result<ShardView> {
        let label = path.display().to_string();
        let view = parse_shard(map, &label)?;
        let mut copies = Vec::with_capacity(targets.len());
        for (name, buf) in targets.iter_mut() {
            let e = view
                .entry(name)
                .ok_or_else(|| Error::InvalidArgument(format!("shard {key} has no tensor {name:?}")))?;
            if e.len != buf.len() as u64 {
                return Err(Error::InvalidArgument(format!(
                    "tensor {name:?} of shard {key} has {} bytes ({} {:?}); the buffer has {}",
                    e.len,
                    e.dtype,
                    e.shape,
                    buf.len()
                )));
            }
            copies.push(CopyTarget { file_offset: e.offset, dst: &mut buf[..] });
        }
        copy_verified(map, &mut copies, manifest, &label)?;
        Ok(view)
    }

    /// Every namespace the daemon holds, at a glance.
    pub fn namespaces(&mut self) -> Result<Vec<NamespaceSummary>> {
        match self.call(&Request::ListNamespaces {})? {
            Reply::Namespaces { namespaces } => Ok(namespaces),
            r => Err(unexpected(r)),
        }
    }

    /// The steps of a namespace, oldest first.
    pub fn steps(&mut self, namespace: &str) -> Result<Vec<StepSummary>> {
        match self.call(&Request::ListSteps { namespace: namespace.into() })? {
            Reply::Steps { steps } => Ok(steps),
            r => Err(unexpected(r)),
        }
    }

    fn deleted(&mut self, req: Request) -> Result<(u64, u64)> {
        match self.call(&req)? {
            Reply::Deleted { shards, bytes } => Ok((shards, bytes)),
            r => Err(unexpected(r)),
        }
    }

    /// Deletes a step; returns (shards, bytes) removed.
    pub fn delete_step(&mut self, namespace: &str, step: u64) -> Result<(u64, u64)> {
        self.deleted(Request::DeleteStep { namespace: namespace.into(), step })
    }

    /// Deletes a whole namespace; returns (shards, bytes) removed.
    pub fn delete_namespace(&mut self, namespace: &str) -> Result<(u64, u64)> {
        self.deleted(Request::DeleteNamespace { namespace: namespace.into() })
    }

    /// Drops incomplete steps newer than `step`: call after resuming from
    /// `step`, before saving again, so leftovers of the crashed run (some
    /// ranks saved, others not) do not block the new saves.
    pub fn discard_incomplete_after(&mut self, namespace: &str, step: u64) -> Result<(u64, u64)> {
        self.deleted(Request::DiscardIncompleteAfter { namespace: namespace.into(), step })
    }

    /// Tells the daemon that every rank of the job has `step` visible (see
    /// [`Request::DeclareComplete`]).
    pub fn declare_complete(&mut self, namespace: &str, step: u64) -> Result<()> {
        self.done(&Request::DeclareComplete { namespace: namespace.into(), step })
    }

    /// Appends a start or failure of a job to the namespace's record.
    pub fn record_failure(&mut self, namespace: &str, record: FailureRecord) -> Result<()> {
        self.done(&Request::RecordFailure { namespace: namespace.into(), record })
    }

    /// The namespace's recorded starts and failures, oldest first.
    pub fn failures(&mut self, namespace: &str) -> Result<Vec<FailureRecord>> {
        match self.call(&Request::Failures { namespace: namespace.into() })? {
            Reply::Failures { records } => Ok(records),
            r => Err(unexpected(r)),
        }
    }

    /// The daemon's status: memory, namespaces, cluster, persistent tier.
    pub fn status(&mut self) -> Result<DaemonStatus> {
        match self.call(&Request::Status {})? {
            Reply::Status(s) => Ok(*s),
            r => Err(unexpected(r)),
        }
    }

    /// Whether to checkpoint at the next step boundary, and why: the
    /// daemon's alerts not yet expired, a standing preemption notice, and
    /// how long persisting a step of `namespace` takes. Cheap: ask every step.
    pub fn advice(&mut self, namespace: &str) -> Result<tierckpt_proto::Advice> {
        match self.call(&Request::Advice { namespace: namespace.into() })? {
            Reply::Advice(a) => Ok(a),
            r => Err(unexpected(r)),
        }
    }

    /// Pins a step (held in memory or in the persistent tier) on every tier
    /// that holds it, optionally naming it; returns the pin and the members
    /// that could not be told.
    pub fn pin(&mut self, namespace: &str, step: u64, name: Option<&str>) -> Result<(PinInfo, Vec<String>)> {
        self.pin_request(Request::Pin {
            namespace: namespace.into(),
            step,
            name: name.map(String::from),
            node_only: false,
        })
    }

    /// Pins `step` in this node's memory only (see [`Request::Pin`]): the
    /// step must be held here.
    pub fn pin_on_this_node(&mut self, namespace: &str, step: u64, name: Option<&str>) -> Result<PinInfo> {
        let req = Request::Pin { namespace: namespace.into(), step, name: name.map(String::from), node_only: true };
        Ok(self.pin_request(req)?.0)
    }

    fn pin_request(&mut self, req: Request) -> Result<(PinInfo, Vec<String>)> {
        match self.call(&req)? {
            Reply::Pinned { pin, not_reached } => Ok((pin, not_reached)),
            r => Err(unexpected(r)),
        }
    }

    /// Unpins a step given by number or by name (exactly one).
    pub fn unpin(&mut self, namespace: &str, step: Option<u64>, name: Option<&str>) -> Result<(PinInfo, Vec<String>)> {
        self.pin_request(Request::Unpin { namespace: namespace.into(), step, name: name.map(String::from) })
    }

    /// The pinned steps of a namespace, with their names and tiers.
    pub fn pins(&mut self, namespace: &str) -> Result<Vec<PinInfo>> {
        match self.call(&Request::Pins { namespace: namespace.into() })? {
            Reply::Pins { pins } => Ok(pins),
            r => Err(unexpected(r)),
        }
    }

    /// The step of `namespace` named `name` (see [`Self::pin`]).
    pub fn resolve(&mut self, namespace: &str, name: &str) -> Result<u64> {
        tierckpt_proto::validate_pin_name(name).map_err(Error::InvalidArgument)?;
        let pins = self.pins(namespace)?;
        pins.iter().find(|p| p.names.iter().any(|n| n == name)).map(|p| p.step).ok_or_else(|| {
            let message =
                format!("no step of {namespace} is named {name:?}; `tierckpt ls {namespace}` lists the names");
            Error::remote(ErrorKind::NotFound, message)
        })
    }
}

/// A reserved, mapped segment being filled. Seal it to publish; dropping it
/// unsealed aborts the reservation.
pub struct PendingShard<'c> {
    client: &'c mut Client,
    id: u64,
    layout: ShardLayout,
    seg: Option<CachedMap>,
    fresh: bool,
}

impl PendingShard<'_> {
    /// Where each tensor goes in the segment.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    fn map(&mut self) -> &mut MmapMut {
        &mut self.seg.as_mut().expect("segment held until seal or abort").map
    }

    /// The bytes of one tensor in the segment, for a caller that writes them
    /// itself (for example a device-to-host copy).
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut [u8]> {
        let range = self.layout.entries.iter().find(|e| e.name == name)?.range();
        Some(&mut self.map()[range])
    }

    /// Copies tensors into the segment in parallel. Each must match the
    /// layout's tensor of the same name.
    pub fn write_tensors(&mut self, tensors: &[TensorData<'_>]) -> Result<()> {
        let mut pieces = Vec::with_capacity(tensors.len());
        for t in tensors {
            let e =
                self.layout.entries.iter().find(|e| e.name == t.name).ok_or_else(|| {
                    Error::InvalidArgument(format!("tensor {:?} is not in this shard's layout", t.name))
                })?;
            if e.len != t.data.len() as u64 || e.dtype != t.dtype || e.shape != t.shape {
                return Err(Error::InvalidArgument(format!(
                    "tensor {:?} is {} {:?} with {} bytes; expected {} {:?} with {} bytes",
                    t.name,
                    t.dtype,
                    t.shape,
                    t.data.len(),
                    e.dtype,
                    e.shape,
                    e.len
                )));
            }
            pieces.push((e.offset as usize, t.data));
        }
        let prefault = self.fresh;
        copy::scatter(&mut self.map()[..], &pieces, prefault);
        Ok(())
    }

    fn release(&mut self) {
        if let Some(seg) = self.seg.take() {
            self.client.cache.put_back(seg);
        }
    }

    /// Publishes the shard. With `wait`, returns once it is visible.
    pub fn seal(mut self, wait: bool) -> Result<()> {
        self.release();
        let id = self.id;
        self.id = u64::MAX;
        self.client.done(&Request::Seal { id, wait })
    }

    /// Gives the reservation back.
    pub fn abort(mut self) -> Result<()> {
        self.release();
        let id = std::mem::replace(&mut self.id, u64::MAX);
        self.client.done(&Request::Abort { id })
    }
}

impl Drop for PendingShard<'_> {
    fn drop(&mut self) {
        if self.id != u64::MAX {
            self.release();
            let id = self.id;
            let _ = self.client.done(&Request::Abort { id });
        }
    }
}

/// A verified shard, mapped read-only.
pub struct MappedShard {
    /// The shard's manifest, every chunk of which was verified.
    pub manifest: Manifest,
    /// Its tensors and metadata.
    pub view: ShardView,
    map: Mmap,
}

impl MappedShard {
    /// The bytes of one tensor, if the shard has it.
    pub fn tensor(&self, name: &str) -> Option<&[u8]> {
        self.view.entry(name).map(|e| &self.map[e.range()])
    }

    /// The shard's `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.view.metadata
    }

    /// The whole safetensors file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

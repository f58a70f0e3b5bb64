"""What the DCP writer, reader and stager share: the step layout in the daemon and one connection.

A DCP checkpoint of a job of W ranks is one daemon step of W + 1 shards:
rank r (0 <= r < W) holds the write items of DCP rank r, as a safetensors file
with one entry per item (tensors with their dtype and local shape, bytes
items as U8); rank W holds DCP's `Metadata`, written by the coordinator after
every data shard is sealed, with the small items the other ranks handed over
inline (bytes items of a staged save). The daemon calls a step complete when
all W + 1 shards are visible, so the metadata shard is the commit point: a
step without it is never `latest`, and the reader refuses it by name.

A `MetadataIndex` maps, in `Metadata.storage_data`, to `(rank, entry, nbytes)`;
rank -1 is the metadata shard.
"""

from __future__ import annotations

import re
import threading

from ..checkpointer import Checkpointer, _dist
from ..errors import TierckptError

FORMAT = "tierckpt-dcp/1"
METADATA_ENTRY = "__dcp_metadata__"
META_RANK = -1  # in storage_data: the item lives in the metadata shard


def rank_world(rank=None):
    """(rank, world size) of the default process group, or (rank or 0, 1) without one."""
    d = _dist()
    if d is None:
        return (rank or 0), 1
    return (d.get_rank() if rank is None else rank), d.get_world_size()


def parse_step(checkpoint_id) -> int | None:
    """The step a DCP `checkpoint_id` names: an int, a string of digits, or `tierckpt://<namespace>/<step>`."""
    if checkpoint_id is None:
        return None
    if type(checkpoint_id) is int and checkpoint_id >= 0:
        return checkpoint_id
    s = str(checkpoint_id)
    m = re.fullmatch(r"(?:tierckpt://[A-Za-z0-9_-]{1,128}/)?(\d{1,19})", s)
    if m is None:
        raise ValueError(f"checkpoint_id {checkpoint_id!r} is not a tierckpt step: use a whole number >= 0 "
                         "(or 'tierckpt://<namespace>/<step>')")
    return int(m.group(1))


def parse_namespace(checkpoint_id) -> str | None:
    m = re.fullmatch(r"tierckpt://([A-Za-z0-9_-]{1,128})/\d+", str(checkpoint_id))
    return m.group(1) if m else None


def valid_checkpoint_id(checkpoint_id) -> bool:
    try:
        return parse_step(checkpoint_id) is not None
    except ValueError:
        return False


class Session:
    """One connection to the node daemon for a writer (and its stager) or a reader, opened on first use.
    It is a `Checkpointer` underneath: the same daemon start, reservations and cached segment mappings."""

    def __init__(self, namespace=None, socket=None, config=None):
        self._cfg = {**(config or {}), "checkpoint_frequency": 1}
        if namespace is not None:
            self._cfg["namespace"] = namespace
        if socket is not None:
            self._cfg["socket"] = socket
        self._ckpt: Checkpointer | None = None
        self.lock = threading.RLock()  # the stager (trainer thread) and the writer (DCP's thread) share it

    def ckpt(self, rank=None) -> Checkpointer:
        with self.lock:
            if self._ckpt is None:
                r, w = rank_world(rank)
                self._ckpt = Checkpointer(dict(self._cfg), rank=r, world_size=w)
            return self._ckpt

    @property
    def namespace(self) -> str:
        return self.ckpt().namespace

    def set_namespace(self, ns: str) -> None:
        if self._ckpt is not None and self._ckpt.namespace != ns:
            raise ValueError(f"checkpoint_id names namespace {ns!r}, this writer/reader is bound to "
                             f"{self._ckpt.namespace!r}; make one per namespace")
        self._cfg["namespace"] = ns

    def reserve(self, step: int, rank: int, world: int, length: int):
        """A reservation for DCP rank `rank` of `world` (the daemon's world is `world + 1`) and its mapping."""
        ck = self.ckpt()
        with self.lock:
            res = ck.client.reserve(ck.namespace, step, rank, world + 1, length)
            try:
                seg = ck._segment(res["path"], length)
            except BaseException:
                self.abort(res["id"])
                raise
        return res, seg

    def seal(self, res_id: int, what: str) -> None:
        try:
            self.ckpt().client.seal(res_id, wait=True)
        except BaseException as e:
            self.abort(res_id)
            raise TierckptError(f"{what}: sealing failed: {e}; the shard was aborted") from e

    def declare_complete(self, step: int) -> None:
        """Every DCP rank's shard and the metadata of `step` are sealed: this node's retention counts
        the step complete at once (see `tierckpt.completion`). Best effort: a step evicted here
        meanwhile, or an older daemon, is no error."""
        ck = self.ckpt()
        try:
            ck.client.declare_complete(ck.namespace, step)
        except TierckptError:
            pass

    def abort(self, res_id: int) -> None:
        try:
            self.ckpt().client.abort(res_id)
        except Exception:
            pass

    def close(self) -> None:
        with self.lock:
            if self._ckpt is not None:
                self._ckpt.close()
                self._ckpt = None

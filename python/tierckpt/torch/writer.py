"""`TierckptWriter`: a DCP `StorageWriter` that saves each rank's write items into its daemon shard.

Each rank resolves its items and copies them into one reserved segment (or, after a
`TierckptStager`, seals the segment the stager already filled, without another copy);
the coordinator then writes DCP's `Metadata` as the step's last shard: the commit point
(see `session`). The coordinator declares each step it commits complete to its daemon, and tells the
other ranks in the next save's plans (`storage_data`), so every node's retention counts the step
complete without waiting for the cluster view.
"""

from __future__ import annotations

import dataclasses
import io

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from . import layout
from . import metadata as md_io
from .session import META_RANK, METADATA_ENTRY, Session, parse_namespace, parse_step, rank_world, \
    valid_checkpoint_id


class TierckptWriter(StorageWriter):
    """Saves a DCP checkpoint as step `step` of `namespace` in the node daemon's memory tier.

    >>> writer = TierckptWriter(namespace="job")
    >>> dcp.save(state_dict, checkpoint_id=step, storage_writer=writer)

    The step comes from `checkpoint_id` (an int, or `"tierckpt://<namespace>/<step>"`) or from
    `step` / `writer.step`. `config` takes the `Checkpointer`'s keys (`socket`, `memory_tier_size`...).
    """

    def __init__(self, step: int | None = None, namespace: str | None = None, socket: str | None = None,
                 config: dict | None = None):
        super().__init__()
        self.step = parse_step(step)
        self.session = Session(namespace, socket, config)
        self.rank, self.world = rank_world()
        self.is_coordinator = self.rank == 0
        self._staged: dict = {}  # step -> stager.StagedShard, filled by TierckptStager
        self._committed = None  # the step this coordinator last committed

    # -- DCP's calls --------------------------------------------------------
    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is None:
            return
        ns = parse_namespace(checkpoint_id)
        if ns is not None:
            self.session.set_namespace(ns)
        step = parse_step(checkpoint_id)
        staged = [s for s in self._staged if s != step]
        if staged:
            raise ValueError(f"checkpoint_id names step {step} but the stager staged step {staged[0]}: set "
                             "writer.step before dcp.async_save (the stager reserves the step's memory first)")
        self.step = step

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return valid_checkpoint_id(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self.rank, self.world = rank_world(kwargs.get("rank"))
        self.session.ckpt(self.rank)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"tierckpt://{self.session.namespace}/{self._need_step()}")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self._committed is None:
            return plans
        return [dataclasses.replace(p, storage_data={"committed": self._committed}) for p in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        step = self._need_step()
        committed = plan.storage_data.get("committed") if isinstance(plan.storage_data, dict) else None
        if committed is not None and not self.is_coordinator:
            self.session.declare_complete(committed)
        staged = self._staged.pop(step, None)
        what = f"DCP step {step} rank {self.rank} of {self.session.namespace!r}"
        try:
            if staged is not None:
                results = self._seal_staged(staged, plan, planner, what)
            else:
                results = self._write(plan, planner, step, what)
        except BaseException:
            if staged is not None:
                staged.abort()
            raise
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator writes the metadata shard last: the step is committed once it is sealed."""
        step = self._need_step()
        storage, refs, names = {}, [], layout.Names()
        for wr in (wr for rank_results in results for wr in rank_results):
            sd = wr.storage_data
            if sd[0] == "inline":
                ref = layout.bytes_ref(names(f"inline/{layout.entry_name(wr.index)}"), sd[1])
                refs.append(ref)
                storage[wr.index] = (META_RANK, ref.name, ref.nbytes)
            else:
                storage[wr.index] = sd
        metadata.storage_data = storage
        refs.append(layout.bytes_ref(names(METADATA_ENTRY), md_io.dumps(metadata)))
        layout.write_shard(self.session, step, self.world, self.world, refs,
                           f"DCP step {step} metadata of {self.session.namespace!r}", {"dcp": "metadata"})
        # Every rank's write succeeded (DCP calls finish only then) and the metadata is sealed.
        self._committed = step
        self.session.declare_complete(step)

    def close(self) -> None:
        """Closes the connection to the daemon (and unmaps the cached segments)."""
        self.session.close()

    # -- helpers ------------------------------------------------------------
    def _need_step(self) -> int:
        if self.step is None:
            raise ValueError("TierckptWriter has no step: pass checkpoint_id=<step> to dcp.save, or set "
                             "TierckptWriter(step=...) / writer.step")
        return self.step

    def _write(self, plan, planner, step, what) -> list:
        names, refs, items = layout.Names(), [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            name = names(layout.entry_name(item.index))
            if item.type == WriteItemType.BYTE_IO:
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
                refs.append(layout.bytes_ref(name, buf))
            else:
                refs.append(layout.tensor_ref(name, data))
            items.append(item)
        layout.write_shard(self.session, step, self.rank, self.world, refs, what)
        return [WriteResult(index=item.index, size_in_bytes=ref.nbytes, storage_data=(self.rank, ref.name,
                                                                                      ref.nbytes))
                for item, ref in zip(items, refs)]

    def _seal_staged(self, staged, plan, planner, what) -> list:
        """Items the stager put in its segment are recorded where they lie; others (bytes items, tensors a
        custom planner made up) go to the coordinator inline, for the metadata shard."""
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if isinstance(data, torch.Tensor):
                entry = staged.entry_of(data)
                if entry is not None:
                    results.append(WriteResult(index=item.index, size_in_bytes=entry[1],
                                               storage_data=(self.rank, entry[0], entry[1])))
                    continue
                raw = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            else:
                raw = bytes(data.getbuffer()) if isinstance(data, io.BytesIO) else bytes(data)
            results.append(WriteResult(index=item.index, size_in_bytes=len(raw), storage_data=("inline", raw)))
        staged.seal(what)
        return results

"""Run under torchrun (gloo, CPU) by test_dcp.py and test_fsdp.py: saves a sharded state through one API, or
loads it (on any number of ranks) and checks it bitwise against the full tensors the saving job wrote.

    dcp_worker.py save|load <api: dcp|async|ckpt> <state: plain|fsdp> <step> <reference file>
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tierckpt import Checkpointer
from tierckpt.torch import TierckptReader, TierckptStager, TierckptWriter

warnings.filterwarnings("ignore")


def plain_state(mesh, seed):
    """DTensors sharded unevenly (5 rows) and replicated, a plain tensor and plain values."""
    g = torch.Generator().manual_seed(seed)
    full = {"w": torch.randn(12, 3, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "r": torch.randn(4, generator=g)}
    sd = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]), "b": distribute_tensor(full["b"], mesh, [Shard(0)]),
          "r": distribute_tensor(full["r"], mesh, [Replicate()]), "steps": torch.tensor(seed),
          "meta": {"epoch": seed, "tag": f"s{seed}"}}
    return sd, full


def fsdp_state(mesh, seed):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(seed % 3 + 1):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    return model, opt, {"model": msd, "optim": osd}


def full_of(x):
    """`x` with every DTensor gathered (collective: every rank calls it in the same order)."""
    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: full_of(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(full_of(v) for v in x)
    return x


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert bits(a) == bits(b), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def main():
    mode, api, kind, step, ref = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ns = f"{kind}-{api}"
    seed = 1 if mode == "save" else 2 + world
    if kind == "plain":
        sd, _ = plain_state(mesh, seed)
        model = opt = None
    else:
        model, opt, sd = fsdp_state(mesh, seed)

    if mode == "save":
        if api == "dcp":
            dcp.save(sd, checkpoint_id=step, storage_writer=TierckptWriter(namespace=ns))
        elif api == "async":
            w = TierckptWriter(step=step, namespace=ns)
            stager = TierckptStager(w)
            fut = dcp.async_save(sd, storage_writer=w, async_stager=stager)
            (fut.result() if hasattr(fut, "result") else fut.upload_completion.result())
            stager.close()
        else:
            with Checkpointer({"namespace": ns, "async_save": False, "checkpoint_frequency": 1}) as c:
                c.save(step, sd)
        full = full_of(sd)
        if rank == 0:
            torch.save(full, ref)
    else:
        if api in ("dcp", "async"):
            reader = TierckptReader(namespace=ns)
            dcp.load(sd, storage_reader=reader)
            assert reader.loaded_step == step, reader.loaded_step
            loaded = sd
        else:
            with Checkpointer({"namespace": ns, "checkpoint_frequency": 1}) as c:
                loaded = c.load(sd, step=step)
            for k in ("model", "optim") if kind == "fsdp" else ("w", "b", "r"):
                assert loaded[k] is sd[k] or kind == "fsdp", f"{k} was not filled in place"
        if kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            msd, osd = get_state_dict(model, opt)
            loaded = {"model": msd, "optim": osd}
        full = full_of(loaded)
        expect = torch.load(ref, weights_only=False)
        same(expect, full)
        print(f"rank {rank}/{world}: {kind} via {api} matches bitwise", flush=True)
    dist.barrier()
    # every rank is done: leave without tearing gloo down, which under load sometimes aborts the process
    # ("terminate called without an active exception") after all the work succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

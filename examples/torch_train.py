#!/usr/bin/env python3
"""A small PyTorch job that checkpoints through tierckpt and resumes after a crash.

Single process:   python examples/torch_train.py --steps 200 --every 10 --out final.txt
Two ranks (gloo): torchrun --nproc-per-node 2 examples/torch_train.py --steps 200 --every 10 --out final.txt
Supervised:       tierckpt run --max-restarts 3 -- python examples/torch_train.py ...

Every rank saves its own shard (model, Adam state, data position and RNG
state) every --every steps and, at start, resumes from the newest complete
checkpoint. At the end each rank writes the sha256 of its model and optimizer
state to --out (--out.rank<R> when there are several ranks): a run killed and
resumed any number of times ends with the same bytes as an uninterrupted one.
"""

import argparse
import datetime
import hashlib
import os
import time

import torch
import torch.distributed as dist

import tierckpt


def init_distributed():
    """gloo process group under torchrun; every restart attempt gets its own store prefix."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=(rank == 0 and not agent_store),
                          timeout=datetime.timedelta(seconds=60))
    # torchrun keeps the previous attempt's keys in its store: without a fresh
    # prefix, restarted workers' gloo groups fail to connect.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"attempt{attempt}", store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return rank, world


def batch(gen, n=32):
    x = torch.randn(n, 32, generator=gen)
    y = x[:, :4].sin() + 0.1 * torch.randn(n, 4, generator=gen)
    return x, y


def state_digest(model, opt) -> str:
    h = hashlib.sha256()
    sd = {"model": model.state_dict(), "optim": opt.state_dict()["state"]}
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for pid in sorted(sd["optim"]):
        for k in sorted(sd["optim"][pid]):
            v = sd["optim"][pid][k]
            h.update(f"{pid}.{k}".encode())
            h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", default="10", help='checkpoint every N steps, or "adaptive"')
    p.add_argument("--out", required=True, help="where to write the final state's sha256")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step (pacing)")
    p.add_argument("--namespace", default=None, help="default: $TIERCKPT_NAMESPACE or torch-train")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world = init_distributed()

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 4))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # this rank's data stream

    ckpt = tierckpt.Checkpointer({
        "checkpoint_frequency": "adaptive" if args.every == "adaptive" else int(args.every),
        "async_save": True,
        "keep_last": 3,
        "namespace": args.namespace or os.environ.get("TIERCKPT_NAMESPACE") or "torch-train",
    })

    def state(step):
        return {"model": model.state_dict(), "optim": opt.state_dict(),
                "data": {"step": step, "generator": gen.get_state()},
                "rng": torch.get_rng_state()}

    start = 0
    restored = ckpt.load(state(0))
    if restored is not None:
        opt.load_state_dict(restored["optim"])
        gen.set_state(restored["data"]["generator"])
        torch.set_rng_state(restored["rng"])
        start = restored["data"]["step"]
        print(f"rank {rank}: resumed from step {start}", flush=True)
    else:
        print(f"rank {rank}: starting from scratch", flush=True)

    for step in range(start + 1, args.steps + 1):
        x, y = batch(gen)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if ckpt.should_save(step):
            ckpt.save(step, state(step))
            if step % 50 == 0:
                print(f"rank {rank}: step {step} loss {loss.item():.5f} saved", flush=True)
    ckpt.wait()

    digest = state_digest(model, opt)
    out = args.out if world == 1 else f"{args.out}.rank{rank}"
    with open(out + ".tmp", "w") as f:
        f.write(digest + "\n")
    os.replace(out + ".tmp", out)
    print(f"rank {rank}: done at step {args.steps}, state sha256 {digest}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of a data-parallel job under `tierckpt.inprocess.run` (for test_inprocess.py).

Each step all-reduces the gradients of a small model over gloo; every
--every steps the Checkpointer saves the rank's model and Adam state. It
writes its progress (pid, step, generation) to --progress and, at the end,
the sha256 of its state to --out.
"""

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

import tierckpt
from tierckpt import inprocess


def digest(model, opt) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for pid, st in sorted(opt.state_dict()["state"].items()):
        for k in sorted(st):
            h.update(f"{pid}.{k}".encode())
            h.update(torch.as_tensor(st[k]).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def new_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--progress", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = int(os.environ["RANK"])
    # Built once per process: a rank that survives a failure keeps them.
    torch.manual_seed(0)
    model = new_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = tierckpt.Checkpointer({"namespace": os.environ["TIERCKPT_NAMESPACE"]})
    pid = os.getpid()

    def report(**kv):
        with open(args.progress, "a") as f:
            f.write(json.dumps({"pid": pid, **kv}) + "\n")

    def state(step):
        return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}

    def train(rec):
        t0 = time.monotonic()
        start = 0
        got = ckpt.load(state(0))
        if got is not None:
            opt.load_state_dict(got["optim"])
            start = got["step"]
        elif rec.in_process:
            # Nothing saved yet: a surviving process starts over from the initial state.
            torch.manual_seed(0)
            model.load_state_dict(new_model().state_dict())
            opt.state.clear()
        report(event="resumed", step=start, generation=rec.generation, in_process=rec.in_process,
               restore_s=time.monotonic() - t0, failures=rec.failures)
        for step in range(start + 1, args.steps + 1):
            gen = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(8, 16, generator=gen)
            loss = (model(x) - x[:, :4]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for q in model.parameters():
                dist.all_reduce(q.grad)
                q.grad /= dist.get_world_size()
            opt.step()
            if step % args.every == 0:
                ckpt.save(step, state(step))
                ckpt.wait()
            report(event="step", step=step, generation=rec.generation)
            time.sleep(args.step_sleep)
        dist.barrier()
        return digest(model, opt)

    result = inprocess.run(train, checkpointer=ckpt, timeout_s=60)
    with open(args.out, "w") as f:
        f.write(result + "\n")
    report(event="done")


if __name__ == "__main__":
    main()

"""`python -m tierckpt.recovery_job`: one rank of a small data-parallel job under `tierckpt.inprocess.run`.

The job `python -m tierckpt.recovery_bench` and the in-process recovery tests launch (under
`tierckpt run --nproc-per-node`, torchrun, or by hand). Each step all-reduces the gradients of an MLP
(`--width`) over gloo and then waits `--step-s`, standing for a GPU's compute (waiting, not spinning);
every `--every` steps the Checkpointer saves the rank's model and Adam state. Every event goes as a JSON
line with its wall-clock time to `--events-dir/rank-<rank>.jsonl`: `start` (the process began), `resumed`
(the process group formed, at `group_at`, and the state was restored, at `restored_at`), `step`, `error`
(the function failed and the process is leaving), `done` (with the sha256 of the final state). A warm
spare (`tierckpt run --spares`) learns its rank in `inprocess.run`, and writes its events from then on.
"""

from __future__ import annotations

import time

STARTED_AT = time.time()  # before the imports, which a new process pays for

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tierckpt.recovery_job", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps of the whole job")
    p.add_argument("--every", type=int, default=5, help="checkpoint every this many steps")
    p.add_argument("--width", type=int, default=256, help="hidden width of the MLP (its state grows as width^2)")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds each step waits, standing for compute")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="nccl: the model on cuda:LOCAL_RANK, its gradients all-reduced by NCCL")
    p.add_argument("--events-dir", required=True, help="directory for the ranks' event files")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.makedirs(args.events_dir, exist_ok=True)
    pid = os.getpid()
    held = []  # events before the rank is known (a spare learns it in inprocess.run)

    def report(event, **kv):
        held.append((event, kv))
        if "RANK" not in os.environ:
            return
        rank = int(os.environ["RANK"])
        with open(os.path.join(args.events_dir, f"rank-{rank}.jsonl"), "a") as f:
            for ev, k in held:
                f.write(json.dumps({"event": ev, "pid": pid, "rank": rank, "at": time.time(), **k}) + "\n")
        held.clear()

    report("start", at=STARTED_AT, spare="RANK" not in os.environ)
    if args.backend == "nccl":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    import torch
    import torch.distributed as dist

    import tierckpt
    from tierckpt import inprocess

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def new_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, args.width), torch.nn.Tanh(),
                                   torch.nn.Linear(args.width, args.width), torch.nn.Tanh(),
                                   torch.nn.Linear(args.width, 4))

    # Built once per process: a rank that recovers in process keeps them.
    model = new_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = tierckpt.Checkpointer({"namespace": os.environ["TIERCKPT_NAMESPACE"]})

    def state(step):
        return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}

    def train(rec):
        rank = rec.rank
        device = torch.device("cpu")
        if args.backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
            model.to(device)  # in place: the optimizer keeps its parameters
        start = 0
        got = ckpt.load(state(0))
        if got is not None:
            opt.load_state_dict(got["optim"])
            start = got["step"]
        elif rec.in_process:
            # Nothing saved yet: a surviving process starts over from the initial state.
            model.load_state_dict(new_model().state_dict())
            opt.state.clear()
        report("resumed", step=start, generation=rec.generation, in_process=rec.in_process,
               group_at=rec.group_at, error_at=rec.error_at, restored_at=time.time(), failures=rec.failures)
        for step in range(start + 1, args.steps + 1):
            gen = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(8, 16, generator=gen).to(device)
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
            time.sleep(args.step_s)
            report("step", step=step, generation=rec.generation)
        dist.barrier()
        return digest(model, opt)

    try:
        result = inprocess.run(train, checkpointer=ckpt, backend=args.backend, timeout_s=60)
    except BaseException as e:
        report("error", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    report("done", digest=result)
    return 0


def digest(model, opt) -> str:
    """sha256 of the model's and the optimizer's tensors, in a fixed order."""
    import torch
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for pid, st in sorted(opt.state_dict()["state"].items()):
        for k in sorted(st):
            h.update(f"{pid}.{k}".encode())
            h.update(torch.as_tensor(st[k]).cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_events(events_dir: str, rank: int) -> list:
    """The events rank `rank` wrote so far (an empty list before its first)."""
    path = os.path.join(events_dir, f"rank-{rank}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


if __name__ == "__main__":
    raise SystemExit(main())

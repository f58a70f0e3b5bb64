#!/usr/bin/env python3
"""Times the Python Checkpointer's CPU load of one state against two one-thread floors, in one run.

    python scripts/py-load-floor.py [--size-mib 1024] [--runs 5] [--daemon target/release/tierckptd]

($TIERCKPT_PYTHON_SRC: the `python/` directory of another version, to compare.)

Floors: `memcpy`, a one-thread copy of the same bytes between two prefaulted
buffers; `read`, one `readinto` of the shard file into the targets (the
bytes read once, no verification). The load verifies every chunk and fills
the targets in place (`load`), or makes new tensors (`load_new`: fresh memory,
whose page faults the floors do not pay). Prints JSON: medians, ranges and ratios.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("TIERCKPT_PYTHON_SRC") or str(ROOT / "python"))  # another version to compare

import torch  # noqa: E402

from tierckpt import Checkpointer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--daemon", default=str(ROOT / "target" / "release" / "tierckptd"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="tierckpt-loadfloor-", dir="/dev/shm")
    proc = subprocess.Popen([a.daemon, "--memory-dir", f"{tmp}/mem", "--memory-tier-size",
                             f"{3 * a.size_mib}MiB"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TIERCKPT_LOG": "warn"})
    try:
        ready = json.loads(proc.stdout.readline())
        c = Checkpointer({"socket": ready["socket"], "namespace": "floor", "checkpoint_frequency": 1},
                         rank=0, world_size=1)
        per = (a.size_mib << 20) // a.tensors // 2
        g = torch.Generator().manual_seed(0)
        state = {f"t{i}": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(a.tensors)}
        c.save(1, state)
        c.wait()
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        nbytes = sum(v.numel() * 2 for v in state.values())
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
        (shard,) = pathlib.Path(tmp).glob("mem/ns/floor/*/rank-*.safetensors")
        flat = torch.empty(os.path.getsize(shard), dtype=torch.uint8).fill_(3)
        res = {"memcpy": [], "read": [], "load": [], "load_new": []}
        for _ in range(a.runs):
            t0 = time.perf_counter()
            dst.copy_(src)
            res["memcpy"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(shard, "rb", buffering=0) as f:
                f.readinto(memoryview(flat.numpy()))
            res["read"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.load(target, step=1)
            res["load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = c.load(step=1)  # into new tensors
            res["load_new"].append(time.perf_counter() - t0)
            del back
        assert all(torch.equal(target[k], state[k]) for k in state)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(json.dumps({"bytes": nbytes, "runs": a.runs,
                          "median_s": med, "range_s": {k: [min(v), max(v)] for k, v in res.items()},
                          "load_vs_memcpy": med["load"] / med["memcpy"], "load_vs_read": med["load"] / med["read"],
                          "load_new_vs_memcpy": med["load_new"] / med["memcpy"],
                          "load_new_vs_read": med["load_new"] / med["read"]},
                         indent=1))
        c.close()
    finally:
        proc.kill()
        proc.wait()
        # as root the daemon mounted a huge-page tmpfs on its new memory directory (the default): ours to remove
        if os.path.ismount(f"{tmp}/mem"):
            subprocess.run(["umount", "-l", f"{tmp}/mem"], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

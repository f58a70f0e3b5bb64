"""`python -m tierckpt.recovery_bench`: recovery from a killed rank, in process beside full restarts.

One data-parallel job (`tierckpt.recovery_job`: `--ranks` gloo ranks on this node, a checkpoint every
`--every` steps) runs first without a failure (the reference), then once under each launcher in
`--launchers`, where rank `--kill-rank` is SIGKILLed once it has done step `--kill-step`:

  in-process        `tierckpt run --nproc-per-node N --restart rank`: only the killed rank starts again; the
                    survivors keep their processes, rebuild the process group and roll back from memory;
  in-process-spare  the same with `--spares 1`: a warm spare, started ahead, takes over the killed rank;
  full-restart      `tierckpt run --nproc-per-node N --restart all --backoff 0s`: every rank starts again;
  torchrun          `torchrun --standalone --max-restarts 1 --monitor-interval 0.1`: its agent restarts every
                    rank.

Each recovery is split on its critical path, from the kill: `detection` (until the first survivor's
collective failed), `rendezvous` (until every rank of the new process group joined), `restore` (until every
rank restored its state) and `first_step` (until every rank finished its first step after it); `total` is their
sum. The job's training time (from the first rank's restore to the last rank's end; `wall_s` counts the
start of the processes too) is given beside the reference's (`goodput`: reference / this), with the steps done
again, and every final state is checked bitwise against the reference's (sha256 per rank).

A daemon: the one at `--socket` or $TIERCKPT_SOCKET, else the bench starts its own `tierckptd`
($TIERCKPT_DAEMON_BIN or on PATH). `tierckpt` is $TIERCKPT_BIN, else the one beside the daemon binary, else on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from .bench import Daemon
from .errors import UnavailableError
from .recovery_job import read_events

LAUNCHERS = ("in-process", "in-process-spare", "full-restart", "torchrun")
PHASES = ("detection", "rendezvous", "restore", "first_step")


def _tierckpt_binary(daemon: Daemon) -> str:
    exe = os.environ.get("TIERCKPT_BIN")
    if not exe and daemon.binary:
        beside = os.path.join(os.path.dirname(daemon.binary), "tierckpt")
        exe = beside if os.path.exists(beside) else None
    exe = exe or shutil.which("tierckpt")
    if not exe:
        raise UnavailableError("no `tierckpt` binary: set TIERCKPT_BIN or put it on PATH")
    return exe


def _command(launcher: str, args, tierckpt: str, socket: str, ns: str, events: str, steps: int) -> list:
    job = [sys.executable, "-m", "tierckpt.recovery_job", "--steps", str(steps), "--every", str(args.every),
           "--width", str(args.width), "--step-s", str(args.step_s), "--backend", args.backend, "--events-dir", events]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                "--max-restarts", "1", "--monitor-interval", "0.1", *job[1:]]
    restart = "all" if launcher == "full-restart" else "rank"
    spares = ["--spares", "1"] if launcher == "in-process-spare" else []
    return [tierckpt, "--socket", socket, "run", "--namespace", ns, "--nproc-per-node", str(args.ranks),
            "--restart", restart, *spares, "--backoff", "0s", "--max-restarts", "1", "--", *job]


def run_job(launcher: str, args, tierckpt: str, socket: str, workdir: str, kill: bool,
            steps: int | None = None) -> dict:
    """Runs the job once under `launcher`, killing a rank if `kill`; returns its events and times."""
    tag = uuid.uuid4().hex[:8]
    ns = f"recovery-{launcher}-{tag}"
    events = os.path.join(workdir, f"events-{launcher}-{tag}")
    env = {**os.environ, "TIERCKPT_SOCKET": socket, "TIERCKPT_NAMESPACE": ns, "OMP_NUM_THREADS": "1"}
    log = open(os.path.join(workdir, f"log-{launcher}-{tag}"), "w")
    t0 = time.time()
    proc = subprocess.Popen(_command(launcher, args, tierckpt, socket, ns, events, steps or args.steps), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kill_at = None
    try:
        if kill:
            victim = _wait_for_step(proc, events, args)
            os.kill(victim, signal.SIGKILL)
            kill_at = time.time()
        code = proc.wait(timeout=args.timeout_s)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        log.close()
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"the {launcher} job exited {code}; its log: {log.name}")
    ranks = [read_events(events, r) for r in range(args.ranks)]
    began = min(e["restored_at"] for ev in ranks for e in ev if e["event"] == "resumed")
    ended = max(e["at"] for ev in ranks for e in ev if e["event"] == "done")
    return {"ranks": ranks, "kill_at": kill_at, "wall_s": wall, "train_s": ended - began}


def _wait_for_step(proc, events: str, args) -> int:
    """Waits until the rank to kill has done `--kill-step`; returns its pid."""
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended (exit {proc.returncode}) before rank {args.kill_rank} "
                               f"reached step {args.kill_step}")
        ev = read_events(events, args.kill_rank)
        done = [e for e in ev if e["event"] == "step" and e["step"] >= args.kill_step]
        if done:
            return done[-1]["pid"]
        time.sleep(0.005)
    raise TimeoutError(f"rank {args.kill_rank} did not reach step {args.kill_step} in {args.timeout_s} s")


def recovery(run: dict) -> dict:
    """The recovery's phases, on its critical path from the kill, and what it cost."""
    kill_at = run["kill_at"]
    ranks = run["ranks"]
    after = [[e for e in ev if e["at"] > kill_at] for ev in ranks]
    errors = [e["at"] for ev in after for e in ev if e["event"] == "error"]
    errors += [e["error_at"] for ev in after for e in ev if e["event"] == "resumed" and e.get("error_at")]
    resumed = [[e for e in ev if e["event"] == "resumed"][-1] for ev in after]
    first_steps = [next(e["at"] for e in ev if e["event"] == "step" and e["at"] > r["restored_at"])
                   for ev, r in zip(after, resumed)]
    detected = min(errors) if errors else None
    group = max(r["group_at"] for r in resumed)
    restored = max(r["restored_at"] for r in resumed)
    first = max(first_steps)
    phases = {
        "detection": None if detected is None else detected - kill_at,
        "rendezvous": group - (kill_at if detected is None else detected),
        "restore": restored - group,
        "first_step": first - restored,
    }
    before = [max((e["step"] for e in ev if e["event"] == "step" and e["at"] <= kill_at), default=0)
              for ev in ranks]
    rolled_back_to = resumed[0]["step"]
    start_pids = [ev[0]["pid"] for ev in ranks]
    end_pids = [[e for e in ev if e["event"] == "done"][-1]["pid"] for ev in ranks]
    return {
        **phases,
        "total": first - kill_at,
        "rolled_back_to": rolled_back_to,
        "steps_redone": max(before) - rolled_back_to,
        "ranks_kept_process": sum(1 for a, b in zip(start_pids, end_pids) if a == b),
        "in_process": [r["in_process"] for r in resumed],
    }


def digests(run: dict) -> list:
    return [[e for e in ev if e["event"] == "done"][-1]["digest"] for ev in run["ranks"]]


def measure(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="tierckpt-recovery-", dir=args.workdir)
    daemon = Daemon(args.socket, 64 << 20, workdir)
    try:
        tierckpt = _tierckpt_binary(daemon)
        # A short job first, unmeasured: the first start of Python and torch reads them from disk.
        run_job("reference", args, tierckpt, daemon.socket, workdir, kill=False, steps=1)
        ref = run_job("reference", args, tierckpt, daemon.socket, workdir, kill=False)
        want = digests(ref)
        report = {"ranks": args.ranks, "backend": args.backend, "steps": args.steps, "every": args.every, "kill_step": args.kill_step,
                  "kill_rank": args.kill_rank, "step_s": args.step_s, "width": args.width,
                  "reference_wall_s": ref["wall_s"], "reference_train_s": ref["train_s"], "launchers": {}}
        for launcher in args.launchers:
            run = run_job(launcher, args, tierckpt, daemon.socket, workdir, kill=True)
            r = recovery(run)
            r["wall_s"] = run["wall_s"]
            r["train_s"] = run["train_s"]
            r["goodput"] = ref["train_s"] / run["train_s"]
            r["bitwise_equal"] = digests(run) == want
            report["launchers"][launcher] = r
        full = report["launchers"].get("full-restart")
        for r in report["launchers"].values():
            r["vs_full_restart"] = full["total"] / r["total"] if full else None
        return report
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def table(report: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    cols = ("launcher", *PHASES, "total", "x faster", "redone", "kept", "goodput", "bitwise")
    rows = [cols]
    for name, r in report["launchers"].items():
        rows.append((name, *(f(r[p]) for p in PHASES), f(r["total"]),
                     "-" if r["vs_full_restart"] is None else f"{r['vs_full_restart']:.1f}",
                     str(r["steps_redone"]), f"{r['ranks_kept_process']}/{report['ranks']}", f(r["goodput"]),
                     "yes" if r["bitwise_equal"] else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [f"recovery from SIGKILL of rank {report['kill_rank']} after step {report['kill_step']}, "
             f"{report['ranks']} {report['backend']} ranks, checkpoint every {report['every']} steps; seconds from the kill; "
             f"reference job {report['reference_train_s']:.2f} s training, {report['reference_wall_s']:.2f} s wall"]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierckpt.recovery_bench", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="nccl needs a GPU per rank (the job's model goes to cuda:LOCAL_RANK)")
    p.add_argument("--kill-step", type=int, default=23)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--launchers", default=",".join(LAUNCHERS), help=f"comma-separated, of {', '.join(LAUNCHERS)}")
    p.add_argument("--socket", help="a running tierckptd (default: $TIERCKPT_SOCKET, else the bench starts one)")
    p.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="keep the events and logs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.launchers = [s.strip() for s in args.launchers.split(",") if s.strip()]
    for name in args.launchers:
        if name not in LAUNCHERS:
            p.error(f"--launchers: unknown launcher {name!r} (known: {', '.join(LAUNCHERS)})")
    if args.ranks < 2:
        p.error(f"--ranks must be at least 2 (a survivor and the killed rank), not {args.ranks}")
    if not 0 <= args.kill_rank < args.ranks:
        p.error(f"--kill-rank {args.kill_rank} is not a rank of {args.ranks}")
    if not args.every <= args.kill_step < args.steps:
        p.error(f"--kill-step {args.kill_step} must be at least --every ({args.every}) and below --steps "
                f"({args.steps})")
    try:
        report = measure(args)
    except UnavailableError as e:
        print(f"recovery_bench: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

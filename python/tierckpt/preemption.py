"""Checkpoints when it matters: preemption signals and notices, and the daemon's alerts.

A `Checkpointer` owns one `Watch`. It turns the configured signals
(``preemption_signals``: SIGTERM and SIGUSR1 by default; Kubernetes evicts
with SIGTERM, Slurm sends a signal ahead of a preemption) into a request to
checkpoint, and asks the node daemon's advice (its preemption notice, a
suspect placement neighbour, a failed health check) at most every
`ADVICE_EVERY_S`. `should_save` asks `Watch.tiers(step)`: in a multi-rank
job the ranks agree at every step (one all-reduce of a flag), so all of
them save the same step. A preemption saves the next step to memory, and
to the persistent tier too when the grace left allows the measured drain
time; `save` then waits until the step is visible, replicated (and
persisted when asked) and exits with `EXIT_PREEMPTED`, which `tierckpt run`
reports as "preempted, resume later" (not a failure). An alert saves the
next step once per alert.

If the training loop never reaches a step boundary, the signal's default
action runs once the grace period is over.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref

from .errors import unsupported_request

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped for a preemption, try again later
ADVICE_EVERY_S = 0.1
WAIT_POLL_S = 0.02
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")

NONE, ALERT, PREEMPT = 0, 1, 2


def signal_number(name) -> int:
    """The number of a signal named "SIGTERM", "TERM" or "sigterm"; ValueError names an unknown one."""
    if not isinstance(name, str):
        raise ValueError(f"config key 'preemption_signals': {name!r} is not a signal name")
    n = name.upper()
    n = n if n.startswith("SIG") else "SIG" + n
    if n in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"config key 'preemption_signals': {name!r} cannot be caught")
    try:
        return int(signal.Signals[n])
    except KeyError:
        raise ValueError(f"config key 'preemption_signals': unknown signal name {name!r} "
                         "(e.g. SIGTERM, SIGUSR1, SIGUSR2)") from None


def validate(c: dict) -> None:
    """Checks the preemption keys of a Checkpointer config (in place: names normalised)."""
    sigs = c["preemption_signals"]
    if isinstance(sigs, str) or not isinstance(sigs, (list, tuple)):
        raise ValueError(f"config key 'preemption_signals': {sigs!r} is not allowed; expected a list of signal "
                         "names such as [\"SIGTERM\", \"SIGUSR1\"] ([] for none)")
    c["preemption_signals"] = [signal.Signals(signal_number(s)).name for s in sigs]
    g = c["preemption_grace_s"]
    if not (type(g) in (int, float) and g == g and 0 < g < float("inf")):
        raise ValueError(f"config key 'preemption_grace_s': {g!r} is not allowed; expected a positive number of "
                         "seconds (the time between the signal or notice and the kill)")
    if type(c["preemption_exit"]) is not bool:
        raise ValueError(f"config key 'preemption_exit': {c['preemption_exit']!r} is not allowed; expected True "
                         "or False")


class Watch:
    """What asks the Checkpointer it belongs to for a checkpoint, and its exit after a preemption's save."""

    def __init__(self, ckpt):
        # Weakly: a Checkpointer dropped unclosed is freed at once (by reference count), not by a later
        # collection of a cycle, so its finalizer unmaps its segments while nothing else is being freed.
        self._ckpt = weakref.ref(ckpt)
        c = ckpt.config
        self.grace_s = float(c["preemption_grace_s"])
        self.exit = c["preemption_exit"]
        self.reason = None  # why a preemption was asked for
        self.deadline = None  # time.monotonic() by which the process is killed
        self.step = None  # the step saved for the preemption
        self.preempted = False  # the preemption's step is saved and safe (when `preemption_exit` is off)
        self._advice = (0.0, None)
        self._advice_supported = True
        self._acted_on = 0  # the newest alert id a save was made for
        self._pending_alert = 0
        self._previous = {}  # the handlers this one replaced, by signal
        if c["preemption_signals"]:
            self._install([signal_number(s) for s in c["preemption_signals"]])

    @property
    def ckpt(self):
        return self._ckpt()

    def _install(self, sigs) -> None:
        if threading.current_thread() is not threading.main_thread():
            import warnings
            warnings.warn("tierckpt: the Checkpointer was made outside the main thread; preemption signals are "
                          "not handled (make it in the main thread, or set preemption_signals=[])", stacklevel=4)
            return
        self._previous = {s: signal.getsignal(s) for s in sigs}
        handler = _handler(weakref.ref(self), dict(self._previous))
        for s in sigs:
            signal.signal(s, handler)

    def close(self) -> None:
        """Puts the previous handlers back."""
        for s, h in self._previous.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _on_signal(self, sig, frame) -> None:
        if self.reason is not None:
            return
        self._ask(signal.Signals(sig).name, self.grace_s)
        t = threading.Timer(self.grace_s, self._give_up, args=(sig,))
        t.daemon = True
        t.start()

    def _give_up(self, sig) -> None:
        """The grace period is over and no step boundary came: the signal's default action."""
        if self.preempted or self.step is not None:
            return
        print(f"tierckpt: no step boundary within the grace period ({self.grace_s} s) after "
              f"{signal.Signals(sig).name}; exiting without a checkpoint", file=sys.stderr, flush=True)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    def _ask(self, reason: str, seconds_left: float) -> None:
        self.reason = reason
        self.deadline = time.monotonic() + seconds_left

    def _daemon_advice(self):
        t, adv = self._advice
        if not self._advice_supported or time.monotonic() - t < ADVICE_EVERY_S:
            return adv
        try:
            adv = self.ckpt._client.advice(self.ckpt.namespace)
        except AttributeError:
            self._advice_supported = False
            adv = None
        except Exception as e:  # an older daemon: the request is unknown
            if unsupported_request(e):
                self._advice_supported = False
            adv = None
        self._advice = (time.monotonic(), adv)
        return adv

    def wants(self) -> int:
        """This rank's request, before the ranks agree: PREEMPT, ALERT or NONE."""
        adv = self._daemon_advice()
        if adv:
            p = adv.get("preemption")
            if p and self.reason is None:
                left = max(0.0, p["deadline_unix_ms"] / 1000.0 - time.time()) if p.get("deadline_unix_ms") \
                    else self.grace_s
                self._ask(f"preemption notice: {p.get('detail', '')}".strip(), left)
            ids = [e["id"] for e in adv.get("events", []) if e.get("kind") != "preemption"]
            if ids and max(ids) > self._acted_on:
                self._pending_alert = max(ids)
        if self.reason is not None and self.step is None:
            return PREEMPT
        return ALERT if self._pending_alert > self._acted_on else NONE

    def tiers(self, step: int, want: int):
        """Tiers to save `step` to for the request `want` the ranks agreed on (the largest of their
        `wants()`), or None."""
        if want == PREEMPT:
            if self.reason is None:
                self._ask("preemption on another rank", self.grace_s)
            self.step = step
            tiers = {"memory"}
            if self._persist_fits():
                tiers.add("persistent")
            self._tiers = tiers
            print(f"tierckpt: {self.reason}: saving step {step} to {', '.join(sorted(tiers))} "
                  f"({self.seconds_left():.1f} s left)", file=sys.stderr, flush=True)
            return tiers
        if want == ALERT:
            self._acted_on = max(self._acted_on, self._pending_alert)
            return {"memory"}
        return None

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic()) if self.deadline is not None else float("inf")

    def _persist_fits(self) -> bool:
        """Whether the grace left allows persisting the step too, by the drain time measured (or the
        daemon's estimate), with half as much again to spare."""
        if self.ckpt._persistent_status() is None:
            return False
        est = self.ckpt._persist_cost.value
        adv = self._advice[1] or {}
        if adv.get("drain_estimate_ms") is not None:
            est = max(est or 0.0, adv["drain_estimate_ms"] / 1000.0)
        return est is not None and 1.5 * est + 1.0 < self.seconds_left()

    def after_save(self, step: int) -> None:
        """After `save(step)`: for the preemption's step, waits until it is safe, then exits."""
        if self.step != step or self.preempted:
            return
        t0 = time.monotonic()
        ckpt = self.ckpt
        ckpt.wait(timeout_s=max(1.0, self.seconds_left()))
        where = ["memory"]
        copies = self._wait_replicated(step)
        if copies is not None:
            where.append("replicated" if copies else "NOT replicated in time")
        if "persistent" in self._tiers:
            where.append("persisted" if self._wait_persisted(step) else "NOT persisted in time")
        self.preempted = True
        print(f"tierckpt: {self.reason}: step {step} is safe ({', '.join(where)}) after "
              f"{time.monotonic() - t0:.2f} s; " + (f"exiting {EXIT_PREEMPTED} (preempted, resume later)"
                                                     if self.exit else "Checkpointer.preempted is set"),
              file=sys.stderr, flush=True)
        if self.exit:
            ckpt.close()
            raise SystemExit(EXIT_PREEMPTED)

    def _until(self, done) -> bool:
        while True:
            if done():
                return True
            if self.seconds_left() <= 0:
                return False
            time.sleep(WAIT_POLL_S)

    def _wait_replicated(self, step: int):
        """Until this rank's shard of `step` has its copies on peers (as many as live nodes allow):
        True once it has, False at the deadline, None without a cluster."""
        ckpt = self.ckpt
        if not (ckpt._client.status() or {}).get("cluster"):
            return None

        def copies_made():
            cl = (ckpt._client.status() or {}).get("cluster") or {}
            live = sum(1 for n in cl.get("nodes", []) if n.get("state") == "alive")
            want = min(1 + int(cl.get("replication_factor", 0)), max(1, live))
            for s in cl.get("namespaces", {}).get(ckpt.namespace, []):
                if s["step"] == step:
                    return len(s["holders"].get(str(ckpt.rank), [])) >= want
            return False
        return self._until(copies_made)

    def _wait_persisted(self, step: int) -> bool:
        ckpt = self.ckpt

        def committed():
            st = (ckpt._client.status() or {}).get("persistent") or {}
            for ns in st.get("namespaces", []):
                if ns.get("namespace") == ckpt.namespace:
                    return (ns.get("last_committed") or -1) >= step
            return False
        return self._until(committed)


def _handler(watch_ref, previous: dict):
    """A signal handler holding its `Watch` weakly (a dropped Checkpointer is not kept alive by it); once
    the Watch is gone, the signal gets its `previous` handler back and is raised again."""

    def on_signal(sig, frame):
        w = watch_ref()
        if w is not None:
            return w._on_signal(sig, frame)
        h = previous.get(sig, signal.SIG_DFL)
        signal.signal(sig, h if h is not None else signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return on_signal


def all_max(d, vals):
    """All-reduce (max) of a few numbers over the default group, on the device its backend needs."""
    import torch
    dev = torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else "cpu"
    t = torch.tensor(vals, dtype=torch.float64, device=dev)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return t.tolist()

"""Checkpoint intervals from Daly's higher-order optimum. Pure math, no torch.

Daly, "A higher order estimate of the optimum checkpoint interval for restart
dumps" (FGCS 2006): with d the time one checkpoint costs and M the mean time
between failures, the compute time between checkpoints that minimises the
expected wall time is

    tau = sqrt(2 d M) * (1 + sqrt(d / (2M)) / 3 + (d / (2M)) / 9) - d   for d < 2M
    tau = M                                                             otherwise
"""

from __future__ import annotations

import math

FAILURE_KINDS = ("exit", "signal", "hang", "daemon_lost")  # every kind but "start"


def daly_interval(d: float, mtbf: float) -> float:
    """Optimal compute time (seconds) between checkpoints costing `d` seconds each, MTBF `mtbf`."""
    if not (mtbf > 0):
        raise ValueError(f"mtbf must be positive, got {mtbf!r}")
    if d < 0 or math.isnan(d):
        raise ValueError(f"checkpoint cost must be >= 0, got {d!r}")
    if d >= 2 * mtbf:
        return float(mtbf)
    x = d / (2 * mtbf)
    return math.sqrt(2 * d * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - d


def mtbf_from_records(prior_s: float, records, now_s: float) -> float:
    """MTBF updated from failure records: (prior + T_observed) / (1 + failures).

    T_observed is `now` minus the first "start" record (0 without one); a
    failure is any record but a start (exit, signal, hang, daemon_lost).
    """
    starts = [r["unix_ms"] for r in records if r.get("kind") == "start"]
    observed = max(0.0, now_s - min(starts) / 1000.0) if starts else 0.0
    failures = sum(1 for r in records if r.get("kind") not in (None, "start"))
    return (prior_s + observed) / (1 + failures)


def interval_steps(cost_s: float | None, mtbf_s: float, step_time_s: float | None,
                   min_interval: int, max_interval: int) -> int:
    """Daly's interval in training steps, clamped to [min_interval, max_interval].

    Without a measured checkpoint cost or step time the answer is the
    conservative `min_interval`.
    """
    if cost_s is None or step_time_s is None or not (step_time_s > 0):
        return int(min_interval)
    tau = daly_interval(cost_s, mtbf_s)
    steps = tau / step_time_s
    if not math.isfinite(steps):
        return int(max_interval)
    return int(min(max(round(steps), min_interval), max_interval))


class Ema:
    """Exponential moving average; the first sample is taken as is."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def add(self, x: float) -> None:
        self.count += 1
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value

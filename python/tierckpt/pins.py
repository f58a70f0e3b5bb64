"""Pinned and named steps, and the loss-spike rule of `Checkpointer.observe` (issue 19).

A pinned step is kept from retention on every tier that holds it (this node's memory, the peers'
copies, the persistent tier) until unpinned; a named one (`best`, `pre-spike-1200`) can be
restored by name (`Checkpointer.load(step="best")`). `SpikeWatch` judges each observed loss
against the moving average of the losses before it: above `loss_spike_factor` times that average
(or not finite) is a spike, and the newest step saved at or before the previous observed step is
pinned as `pre-spike-<spike step>`.
"""

from __future__ import annotations

import collections
import math
import re

from .errors import NotFoundError

DEFAULTS = {
    "loss_spike_factor": 3.0,
    "loss_spike_window": 50,
    "loss_spike_min_steps": 10,
}

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def validate_name(name) -> str:
    """The name of a step, checked as the daemon checks it; ValueError says what is wrong."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"step name {name!r} must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
    if name.isdigit():
        raise ValueError(f"step name {name!r} is all digits and would read as a step number")
    return name


def validate_config(c: dict) -> None:
    """Checks the loss-spike keys of a filled-in config; ValueError names the key and value."""
    f = c["loss_spike_factor"]
    if not (type(f) in (int, float) and math.isfinite(f) and f > 1):
        raise ValueError(f"config key 'loss_spike_factor': {f!r} is not allowed; expected a number > 1")
    for key, lo in (("loss_spike_window", 1), ("loss_spike_min_steps", 1)):
        v = c[key]
        if not (type(v) is int and v >= lo):
            raise ValueError(f"config key {key!r}: {v!r} is not allowed; expected a whole number >= {lo}")


class SpikeWatch:
    """The loss-spike rule: a loss above `factor` times the moving average of the `window`
    finite losses observed before it, once `min_steps` have been observed, or a loss that is
    not finite, is a spike."""

    def __init__(self, factor: float, window: int, min_steps: int):
        self.factor = float(factor)
        self.min_steps = min_steps
        self.losses: collections.deque = collections.deque(maxlen=window)
        self.seen = 0
        self.prev_step: int | None = None

    def observe(self, step, loss) -> bool:
        """Whether `loss` at `step` is a spike; ValueError for a bad step or loss."""
        if type(step) is not int or step < 0:
            raise ValueError(f"observe: step must be a whole number >= 0, got {step!r}")
        if self.prev_step is not None and step <= self.prev_step:
            raise ValueError(f"observe: step {step} is not after the previous observed step {self.prev_step}")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            try:
                loss = float(loss)  # a 0-d tensor or numpy scalar
            except (TypeError, ValueError):
                raise ValueError(f"observe: loss must be a number, got {type(loss).__name__} {loss!r}") from None
        loss = float(loss)
        if loss < 0:
            raise ValueError(f"observe: loss {loss!r} at step {step} is negative; the spike rule needs losses >= 0")
        self.prev_step, self.seen = step, self.seen + 1
        if not math.isfinite(loss):
            return True
        spike = (self.seen > self.min_steps and len(self.losses) > 0
                 and loss > self.factor * (sum(self.losses) / len(self.losses)))
        self.losses.append(loss)
        return spike


def pre_spike_step(steps: list, before: int, rank: int) -> int | None:
    """The newest step at or before `before` in a `list_steps` answer that is complete here or
    holds `rank`'s shard: in a job over several nodes no node holds every rank, and every rank
    saves the same steps, so each node pins the step its ranks saved."""
    done = [s["step"] for s in steps
            if s["step"] <= before and (s.get("complete") or rank in s.get("ranks", []))]
    return max(done) if done else None


def resolve(client, namespace: str, name: str) -> int:
    """The step named `name`; NotFoundError names it when no step has that name."""
    validate_name(name)
    for p in client.pins(namespace):
        if name in p.get("names", []):
            return int(p["step"])
    raise NotFoundError(f"no step of {namespace} is named {name!r}; `tierckpt ls {namespace}` lists the names")

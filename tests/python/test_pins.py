"""Pinned and named steps from Python (issue 19): `observe` pins the step before a loss spike,
retention keeps it, `load(step=NAME)` restores it bitwise; bad arguments and settings are refused."""

import math

import numpy as np
import pytest
import torch

from tierckpt import Checkpointer, Client
from tierckpt.errors import NotFoundError

from conftest import run_daemon


@pytest.fixture
def keep2_daemon():
    yield from run_daemon("--keep-last", "2")


def ckpt(daemon, **cfg):
    return Checkpointer({"socket": daemon["socket"], "namespace": "spiky", "checkpoint_frequency": 1,
                         "async_save": False, **cfg}, rank=0, world_size=1)


def state(step):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g), "step": step}


def held(daemon):
    return [s["step"] for s in Client(daemon["socket"]).list_steps("spiky")]


def test_observe_pins_the_step_before_a_spike_and_load_by_name_restores_it(keep2_daemon):
    c = ckpt(keep2_daemon, loss_spike_min_steps=5, loss_spike_window=10)
    losses = [2.0 - 0.01 * i for i in range(20)]
    losses[12] = 50.0  # the spike, at step 12
    seen = []
    for step, loss in enumerate(losses):
        c.save(step, state(step))
        seen.append(c.observe(step, loss))
    assert [i for i, s in enumerate(seen) if s] == [12], seen
    # step 12's state was saved before its loss was observed: the pin is on step 11
    pins = c.pins()
    assert [(p["step"], p["names"]) for p in pins] == [(11, ["pre-spike-12"])], pins
    assert held(keep2_daemon) == [11, 18, 19], "keep_last 2 and the pinned step"
    out = c.load(step="pre-spike-12")
    assert out["step"] == 11
    assert torch.equal(out["w"], state(11)["w"]) and out["w"].numpy().tobytes() == state(11)["w"].numpy().tobytes()
    with pytest.raises(NotFoundError, match="nope"):
        c.load(step="nope")
    # by hand: a name, then unpin it
    c.pin(19, "best")
    assert c.load(step="best")["step"] == 19
    c.unpin(step=11)
    c.save(20, state(20))
    assert held(keep2_daemon) == [19, 20], "unpinned, retention drops step 11; best (19) stays"
    c.close()


def test_a_non_finite_loss_is_a_spike_even_early(keep2_daemon):
    c = ckpt(keep2_daemon)
    c.save(0, state(0))
    assert c.observe(0, 1.0) is False
    c.save(1, state(1))
    assert c.observe(1, float("nan")) is True
    assert [(p["step"], p["names"]) for p in c.pins()] == [(0, ["pre-spike-1"])]
    assert c.observe(2, np.float32(1.0)) is False, "numpy scalars are losses"
    assert c.observe(3, torch.tensor(math.inf)) is True, "so are 0-d tensors"
    c.close()


@pytest.mark.parametrize("step,loss,said", [
    (5, "high", "loss must be a number"),
    (5, -1.0, "negative"),
    (-1, 1.0, "step must be a whole number"),
    (1.5, 1.0, "step must be a whole number"),
    (5, None, "loss must be a number"),
])
def test_bad_observe_arguments_say_what_is_wrong(daemon, step, loss, said):
    c = ckpt(daemon)
    with pytest.raises(ValueError, match=said):
        c.observe(step, loss)
    c.close()


def test_observe_steps_must_grow_and_names_are_checked(daemon):
    c = ckpt(daemon)
    c.observe(3, 1.0)
    with pytest.raises(ValueError, match="not after the previous observed step 3"):
        c.observe(3, 1.0)
    c.save(1, state(1))
    for bad in ("1200", "a b", "", "x" * 65):
        with pytest.raises(ValueError, match="step name"):
            c.pin(1, bad)
    with pytest.raises(NotFoundError, match="spiky/step 7"):
        c.pin(7)
    with pytest.raises(ValueError, match="exactly one"):
        c.unpin()
    c.close()


@pytest.mark.parametrize("cfg,key", [
    ({"loss_spike_factor": 1.0}, "loss_spike_factor"),
    ({"loss_spike_factor": float("nan")}, "loss_spike_factor"),
    ({"loss_spike_factor": "3"}, "loss_spike_factor"),
    ({"loss_spike_window": 0}, "loss_spike_window"),
    ({"loss_spike_window": 2.5}, "loss_spike_window"),
    ({"loss_spike_min_steps": -1}, "loss_spike_min_steps"),
])
def test_bad_spike_settings_name_the_key(daemon, cfg, key):
    with pytest.raises(ValueError) as e:
        Checkpointer({"socket": daemon["socket"], **cfg}, rank=0, world_size=1)
    assert repr(key) in str(e.value), str(e.value)


def test_each_rank_pins_the_step_it_saved_though_another_rank_has_not_yet(daemon):
    # In a job over several nodes no node holds every rank: the step a rank saved is the one to pin.
    cfg = {"socket": daemon["socket"], "namespace": "spiky", "async_save": False, "loss_spike_min_steps": 1}
    r0 = Checkpointer(cfg, rank=0, world_size=2)
    r1 = Checkpointer(cfg, rank=1, world_size=2)
    for step in (1, 2, 3):
        r0.save(step, state(step))
        r1.save(step, state(step))
    r0.save(4, state(4))  # rank 1 has not saved step 4 yet
    assert r0.observe(3, 1.0) is False and r0.observe(4, 1.0) is False
    assert r0.observe(5, 100.0) is True
    assert [(p["step"], p["names"]) for p in r0.pins()] == [(4, ["pre-spike-5"])]
    r0.close()
    r1.close()


def test_rank_0_pins_a_spike_on_every_node_and_the_other_ranks_on_their_own(two_nodes):
    _, sockets = two_nodes
    cfg = {"namespace": "spread", "async_save": False, "loss_spike_min_steps": 1}
    ranks = [Checkpointer({**cfg, "socket": s}, rank=r, world_size=2) for r, s in enumerate(sockets)]
    nodes = [Client(s) for s in sockets]

    def pinned(node):
        return [(p["step"], p["names"]) for p in node.pins("spread")]

    for step in (1, 2):
        for r in ranks:
            r.save(step, state(step))
    assert ranks[1].observe(2, 1.0) is False and ranks[1].observe(3, 100.0) is True
    assert pinned(nodes[1]) == [(2, ["pre-spike-3"])]
    assert pinned(nodes[0]) == [], "rank 1 pins its own node only"
    assert ranks[0].observe(2, 1.0) is False and ranks[0].observe(3, 100.0) is True
    assert pinned(nodes[0]) == pinned(nodes[1]) == [(2, ["pre-spike-3"])], "rank 0's pin reaches every member"
    for r in ranks:
        r.close()

"""`Checkpointer.prepare`: the next save's segment set aside, mapped and faulted in beforehand."""

import os
import pathlib

import pytest
import torch

from tierckpt import Checkpointer, Client

from test_checkpointer import assert_same
from test_load import big_state, shard_file


def ckpt(daemon, ns, rank=0, world_size=1):
    return Checkpointer({"socket": daemon["socket"], "namespace": ns, "checkpoint_frequency": 1,
                         "async_save": False}, rank=rank, world_size=world_size)


def rss_kib(path):
    """Resident KiB of this process's mapping of `path` (0 when it is not mapped)."""
    total, inside = 0, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_the_first_save_lands_in_the_prepared_segment_already_mapped_here(daemon):
    state = big_state()
    with ckpt(daemon, "prep") as c:
        c.prepare(state)
        path = c._prepared[0]
        c._join_prepare()
        mapped_kib = rss_kib(path)
        ino = os.stat(path).st_ino
        c.save(1, state)
        assert os.stat(shard_file(daemon, "prep")).st_ino == ino, "the save did not use the prepared segment"
        assert mapped_kib * 1024 >= os.path.getsize(shard_file(daemon, "prep")) - 4096, \
            f"only {mapped_kib} KiB of the prepared segment were faulted in"
        out = c.load(None, 1)
    assert_same(out, state)


def test_two_ranks_each_get_the_segment_they_prepared(daemon):
    state = big_state()
    a, b = ckpt(daemon, "two", 0, 2), ckpt(daemon, "two", 1, 2)
    try:
        a.prepare(state)
        b.prepare(state)
        pa, pb = a._prepared[0], b._prepared[0]
        assert pa != pb
        ia, ib = os.stat(pa).st_ino, os.stat(pb).st_ino
        b.save(1, state)  # the later one saves first: it must not take a's
        a.save(1, state)
        files = {f.name: f.stat().st_ino for f in pathlib.Path(daemon["dir"]).glob("mem/ns/two/*/*.safetensors")}
        assert files == {"rank-00000-of-00002.safetensors": ia, "rank-00001-of-00002.safetensors": ib}, files
    finally:
        a.close()
        b.close()


def test_a_prepare_that_does_not_fit_warns_and_the_save_still_works(daemon):
    huge = {"x": torch.empty(300 << 20, dtype=torch.uint8)}  # more than the 256 MiB tier
    with ckpt(daemon, "nofit") as c:
        with pytest.warns(UserWarning, match="no segment set aside"):
            c.prepare(huge)
        state = big_state()
        c.save(1, state)
        assert_same(c.load(None, 1), state)


def test_a_daemon_asked_to_prepare_more_than_it_holds_names_the_size(daemon):
    cl = Client(daemon["socket"])
    try:
        with pytest.raises(Exception, match="capacity|exceed|room"):
            cl.prepare(1 << 40)
        got = cl.prepare(1 << 20)
        assert got["len"] >= 1 << 20 and os.path.exists(got["path"])
        # a stale or made-up segment name is only a hint: the reservation is served anyway
        r = cl.reserve("bogus", 1, 0, 1, 4096, segment="/etc/passwd")
        assert r["path"] != "/etc/passwd" and os.path.getsize(r["path"]) == 4096
        cl.abort(r["id"])
    finally:
        cl.close()


def test_a_segment_reused_for_a_slightly_longer_shard_is_mapped_again_to_its_length(daemon):
    """The mapping cache is keyed by pages: a segment recycled for a shard a few bytes longer (another
    header, same pages) must not be served by the shorter mapping a previous save made of it."""
    with ckpt(daemon, "grow") as c:
        small = {"x": torch.arange(4000, dtype=torch.float32)}
        c.save(1, small)
        seg = next(iter(c._maps.values()))
        c.client.delete_step("grow", 1)  # the segment goes back to the pool, still mapped here
        longer = {"x_with_a_much_longer_name_" + "y" * 40: torch.arange(4000, dtype=torch.float32)}
        _, _, length = c._plan(2, longer)
        assert length > seg.length and -(-length // 4096) == -(-seg.length // 4096), (length, seg.length)
        c.save(2, longer)
        assert_same(c.load(None, 2), longer)

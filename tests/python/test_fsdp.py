"""FSDP2 (`fully_shard`) and DTensor state through tierckpt under torchrun (gloo, CPU): model and optimizer
state from `get_state_dict`, saved on 2 ranks through DCP (TierckptWriter, and async_save with the stager)
and through the Checkpointer, loaded on 1, 2 and 4 ranks and compared bitwise with the full tensors."""

import pytest
import torch

from tierckpt import Checkpointer

from dcp_worker import bits
from test_dcp import saved  # noqa: F401  (the module's daemon and saved steps)


@pytest.mark.parametrize("nproc", [1, 2, 4])
@pytest.mark.parametrize("api", ["dcp", "ckpt"])
def test_fsdp2_model_and_optimizer_round_trip(saved, api, nproc):  # noqa: F811
    saved.load(nproc, api, "fsdp")


def test_fsdp2_async_save_with_the_stager_loads_on_4_ranks(saved):  # noqa: F811
    saved.load(4, "async", "fsdp")


@pytest.mark.parametrize("nproc", [1, 4])
def test_dtensors_through_the_checkpointer_reshard(saved, nproc):  # noqa: F811
    saved.load(nproc, "ckpt", "plain")


def test_dtensors_saved_on_2_ranks_load_as_full_tensors_without_a_process_group(saved):  # noqa: F811
    ref = saved.ensure("ckpt", "plain")
    with Checkpointer({"socket": saved.daemon["socket"], "namespace": "plain-ckpt", "checkpoint_frequency": 1},
                      rank=0, world_size=1) as c:
        got = c.load(step=5)
        into = {"w": torch.zeros(12, 3)}
        c.load(into, step=5)
    expect = torch.load(ref, weights_only=False)
    for k in ("w", "b", "r", "steps"):
        assert type(got[k]) is torch.Tensor and got[k].dtype == expect[k].dtype, k
        assert got[k].shape == expect[k].shape and bits(got[k]) == bits(expect[k]), f"{k}: not the full tensor"
    assert got["meta"] == expect["meta"]
    assert bits(into["w"]) == bits(expect["w"]), "a plain target of the global shape was not filled"


def test_a_corrupt_shard_of_another_rank_is_never_loaded_into_a_dtensor_target(saved, tmp_path):  # noqa: F811
    import os
    import pathlib

    from tierckpt import CorruptError
    from test_dcp import torchrun
    torchrun(2, "save", "ckpt", "plain", 6, tmp_path / "ref.pt", sock=saved.daemon["socket"])
    other = pathlib.Path(saved.daemon["dir"]) / "mem/ns/plain-ckpt" / f"{6:020}" / "rank-00001-of-00002.safetensors"
    with open(other, "r+b") as f:
        f.seek(os.path.getsize(other) - 8)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    into = {"w": torch.zeros(12, 3)}  # rank 0 alone: half of it lies in rank 1's shard
    with Checkpointer({"socket": saved.daemon["socket"], "namespace": "plain-ckpt", "checkpoint_frequency": 1},
                      rank=0, world_size=1) as c:
        with pytest.raises(CorruptError) as e:
            c.load(into, step=6)
    assert "step 6 rank 1" in str(e.value) and "corrupt" in str(e.value).lower(), str(e.value)
    assert torch.count_nonzero(into["w"]) == 0, "bytes of a step that failed to load reached the target"

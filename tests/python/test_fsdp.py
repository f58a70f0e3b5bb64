"""FSDP2 (`fully_shard`) and DTensor state through tierckpt under torchrun (gloo, CPU): model and optimizer
state from `get_state_dict`, saved on 2 ranks through DCP (TierckptWriter, and async_save with the stager)
and through the Checkpointer, loaded on 1, 2 and 4 ranks and compared bitwise with the full tensors."""

import pytest

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

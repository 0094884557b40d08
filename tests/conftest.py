"""Every test starts from the same global RNG state, so a failure reproduces."""

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fake_world():
    """rank 0 of a 2-process world whose collectives do nothing (torch's ``fake`` backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()

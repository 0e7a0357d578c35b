"""Fixtures of the training tests."""

from __future__ import annotations

import os

import pytest
import torch

from tests.servers import free_port


@pytest.fixture(scope="session")
def distributed():
    """A one-rank gloo process group for in-process DeepSpeed engines, made once per session:
    DeepSpeed keeps its groups across engines, and one made again after a destroy is not
    registered with them."""
    import deepspeed

    if not torch.distributed.is_initialized():
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
        os.environ.update(env)
        deepspeed.init_distributed("gloo")
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ray_serve():
    """One local Ray with Serve for a module, as on a cluster: each family's fine-tuning runs
    on it and its export is deployed on it (a Ray per step would start two per test)."""
    from serving.local import local_serve

    with local_serve() as url:
        yield url

"""Test setup: the Triton interpreter where there is no GPU, the gpu marker's skip, and the
xdist group of the tests that start a Ray."""

import os

import pytest
import torch

# Kernels run compiled on a CUDA machine and interpreted elsewhere. This must be decided
# before any module that defines @triton.jit kernels is imported (the decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# local Ray clusters started by tests do not use token authentication
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    # under pytest-xdist (`make test` runs two workers): the tests that start a Ray all go to
    # one worker, one after another, as each sizes its Ray for the whole machine; the others
    # (kernels, models, packaging) run beside them
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.xdist_group("ray"))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 for the whole session."""
    from tests.servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()

"""Op tests run with NaN-filled torch.empty so an unwritten output element cannot pass."""

import pytest
import torch

from gazeattn.ops.gaze.launch import interpreted
from tests.ops.kernel_paths import use_cpu_kernel

# tests that call the Triton backend on CPU tensors, i.e. under the interpreter
INTERPRETER_TESTS = ("test_triton_gaze.py", "test_triton_decode.py")


def pytest_collection_modifyitems(config, items):
    if interpreted():
        return
    skip = pytest.mark.skip(
        reason="runs the Triton kernels interpreted on CPU tensors; on this CUDA machine "
        "they run compiled (tests/ops/test_triton_gpu.py)"
    )
    for item in items:
        if item.path.name in INTERPRETER_TESTS:
            item.add_marker(skip)


def _nan_filled(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    return make


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))


@pytest.fixture(params=["cpu-kernel", "torch"])
def gather_path(request, monkeypatch):
    """Both ways the gathered decode attention runs on CPU (``use_cpu_kernel``)."""
    use_cpu_kernel(monkeypatch, request.param == "cpu-kernel")
    return request.param

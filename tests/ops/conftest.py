"""Op tests run with NaN-filled torch.empty so an unwritten output element cannot pass."""

import pytest
import torch


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

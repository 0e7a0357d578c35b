"""Typed YAML configs: strict keys, nested sections, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gazeattn.typed_config import apply_overrides, flatten, from_dict, load_yaml, to_dict


@dataclass(kw_only=True)
class Inner:
    size: tuple[int, int] = (1, 2)
    rate: float = 0.5
    name: str | None = None


@dataclass(kw_only=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 3


def test_defaults_and_nesting():
    cfg = from_dict(Outer, {"inner": {"size": [3, 4], "rate": 1}, "steps": 7})
    assert cfg.inner.size == (3, 4) and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert flatten(to_dict(cfg)) == {"inner.size": [3, 4], "inner.rate": 1.0, "inner.name": None, "steps": 7}


def test_unknown_keys_fail_with_their_path():
    with pytest.raises(ValueError, match=r"inner: unknown keys \['sise'\]"):
        from_dict(Outer, {"inner": {"sise": 3}})
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\ninner:\n  rate: 0.1\n")
    cfg = load_yaml(Outer, path, ["inner.name=abc", "steps=9", "inner.size=[5, 6]"])
    assert cfg == Outer(inner=Inner(size=(5, 6), rate=0.1, name="abc"), steps=9)
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ValueError, match="unknown keys"):
        load_yaml(Outer, None, ["stepz=1"])

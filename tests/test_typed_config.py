"""Typed YAML configs: strict keys, types checked on load, overrides parsed to the field's type."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import Field

from gazeattn.ops import GazeConfig
from gazeattn.ops.config import dense_twin
from gazeattn.typed_config import (
    ConfigError,
    Settings,
    apply_overrides,
    flatten,
    load_yaml,
    to_dict,
    validate,
)
from training.config import load_config


@dataclass(kw_only=True, frozen=True)
class Frozen:
    size: tuple[int, int] = (1, 2)


class Inner(Settings):
    size: tuple[int, int] = (1, 2)
    rate: float = 0.5
    name: str | None = None
    frozen: Frozen = Field(default_factory=Frozen)


class Outer(Settings):
    inner: Inner = Field(default_factory=Inner)
    steps: int = 3
    options: dict = Field(default_factory=dict)


def test_defaults_nesting_and_round_trip():
    cfg = validate(Outer, {"inner": {"size": [3, 4], "rate": 1}, "steps": 7})
    assert cfg.inner.size == (3, 4) and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert validate(Outer, to_dict(cfg)) == cfg
    assert flatten(to_dict(cfg)) == {
        "inner.size": [3, 4],
        "inner.rate": 1.0,
        "inner.name": None,
        "inner.frozen.size": [1, 2],
        "steps": 7,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"sise": 3}}, "inner.sise: unknown key"),
        ({"inner": {"frozen": {"sise": 3}}}, "inner.frozen.sise: unknown key"),
        ({"inner": 3}, "inner: Input should be a valid dictionary"),
        ({"steps": "abc"}, "steps: Input should be a valid integer.*'abc'"),
        ({"inner": {"rate": "fast"}}, "inner.rate: Input should be a valid number"),
    ],
    ids=["unknown", "unknown-in-dataclass", "not-a-section", "int", "float"],
)
def test_bad_keys_and_types_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(Outer, data)


def test_yaml_float_strings_are_numbers(tmp_path):
    # PyYAML reads 1e-5 (no dot) as the string '1e-5'
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 1e-5\n")
    assert load_yaml(Outer, path).inner.rate == pytest.approx(1e-5)


def test_overrides_are_parsed_to_the_fields_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\ninner:\n  rate: 0.1\n  name: x\n")
    cfg = load_yaml(
        Outer,
        path,
        ["inner.name=123", "steps=9", "inner.size=[5, 6]", "inner.rate=2e-3", "options.a.b=4"],
    )
    assert cfg.inner.name == "123" and cfg.steps == 9 and cfg.inner.size == (5, 6)
    assert cfg.inner.rate == pytest.approx(2e-3) and cfg.options == {"a": {"b": 4}}
    assert load_yaml(Outer, path, ["inner.name=null"]).inner.name is None


def test_bad_overrides_fail_with_the_key():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(Outer, {}, ["steps"])
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_yaml(Outer, None, ["stepz=1"])
    with pytest.raises(ConfigError, match="unknown key 'inner.frozen.bad'"):
        load_yaml(Outer, None, ["inner.frozen.bad=1"])
    with pytest.raises(ConfigError, match="steps: Input should be a valid integer.*'abc'"):
        load_yaml(Outer, None, ["steps=abc"])


def test_finetune_config_rejects_at_load():
    with pytest.raises(ConfigError, match="train.max_steps: .*valid integer.*'abc'"):
        load_config("configs/demo.yaml", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config("configs/demo.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="model.gaze: .*keep_ratio must be in"):
        load_config("configs/demo.yaml", ["model.gaze.keep_ratio=2"])
    with pytest.raises(ConfigError, match="train.deepspeed_config: .*no file"):
        load_config("configs/demo.yaml", ["train.deepspeed_config=configs/nope.json"])


def test_deepspeed_json_must_agree_with_grad_accum(tmp_path):
    import json

    ds = json.loads(open("configs/deepspeed/zero3_cpu.json").read())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ds, "gradient_accumulation_steps": 8}))
    sets = [f"train.deepspeed_config={path}"]
    with pytest.raises(ConfigError, match="train.grad_accum is 1 but ds.json sets .*: 8"):
        load_config("configs/demo.yaml", sets)
    assert load_config("configs/demo.yaml", [*sets, "train.grad_accum=8"]).train.grad_accum == 8


def test_gaze_settings_are_the_gaze_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gaze:\n    top_k: 20\noptim:\n  lr: 1e-5\n")
    cfg = load_config(path)
    # either budget alone: top_k without keep_ratio
    assert cfg.model.gaze == GazeConfig(top_k=20)
    assert cfg.optim.lr == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="model.gaze: .*exactly one of top_k or keep_ratio"):
        load_config(path, ["model.gaze.keep_ratio=0.5"])
    switched = load_config(path, ["model.gaze.keep_ratio=0.5", "model.gaze.top_k=null"])
    assert switched.model.gaze == GazeConfig(keep_ratio=0.5)
    dense = load_config(path, ["model.attn=dense"]).model.gaze_config()
    assert dense == dense_twin(GazeConfig(top_k=20))
    assert (dense.top_k, dense.keep_ratio, dense.backend) == ("all", None, "dense")
    assert dense.num_context_tokens == 4 and dense.region_size == (1, 6, 6)


def test_the_finetune_job_stops_at_a_bad_config_before_ray(capsys):
    import ray

    from jobs.finetune import main

    with pytest.raises(SystemExit) as stopped:
        main(["--config", "configs/demo.yaml", "--set", "train.max_steps=abc"])
    assert stopped.value.code == 2
    assert "train.max_steps: Input should be a valid integer" in capsys.readouterr().err
    assert not ray.is_initialized()

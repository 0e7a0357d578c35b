"""The tiny pretrained checkpoint: the script that makes it, and the one the demo ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "checkpoints" / "tiny-grid3"


def test_a_short_pretraining_saves_a_stock_checkpoint(tmp_path):
    """Two stages, the second from the first's weights; hub layout (a stock LLaVA
    config, no gaze settings), the log, the record per stage; the saved weights compute what
    was trained (checked inside each stage against the trained model's logits)."""
    from transformers import AutoConfig

    from gazeattn.model import load_model
    from jobs.pretrain_tiny import main

    stage = str(REPO / "configs" / "pretrain-tiny.yaml")
    main(["--out", str(tmp_path / "ckpt"), "--eval-limit", "4", "--config", stage,
          "--config", stage, "--set", "train.max_steps=3", "--set", "data.synthetic.n_train=8",
          "--set", "data.synthetic.n_test=4", "--set", "train.log_every=1"])  # fmt: skip
    out = tmp_path / "ckpt"
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llava" and getattr(config, "gaze_config", None) is None
    record = json.loads((out / "pretrain.json").read_text())
    first, second = record["stages"]
    assert first["stage"] == second["stage"] == "configs/pretrain-tiny.yaml"
    assert first["config"]["model"]["name_or_path"] == "tiny"
    assert second["config"]["model"]["name_or_path"] != "tiny"  # the first stage's output
    assert set(second["held_out"]) >= {"all", "grid_shape"}
    assert record["held_out"] == second["held_out"]
    log = (out / "pretrain.log").read_text()
    assert "stage 1/2" in log and "stage 2/2" in log and log.count("step 3/3") == 2
    assert not list(out.glob("pretrain-*")), "no file of the first stage's record is copied"
    model, _ = load_model(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_pretraining_refuses_what_is_not_the_stock_function(tmp_path):
    from gazeattn.typed_config import ConfigError
    from jobs.pretrain_tiny import pretrain

    cfg = load_config(REPO / "configs" / "pretrain-tiny.yaml", ["model.attn=gaze"])
    with pytest.raises(ConfigError, match="stock model"):
        pretrain(cfg, tmp_path)


def _recorded_part(config: dict, recorded: dict) -> dict:
    """``config`` with only the keys ``recorded`` has (recursively); a recorded key that the
    config no longer has stays missing, so the comparison fails on it."""
    return {
        key: _recorded_part(value, recorded[key])
        if isinstance(value, dict) and isinstance(recorded[key], dict)
        else value
        for key, value in config.items()
        if key in recorded
    }


def test_the_shipped_checkpoint_is_what_its_record_says():
    """The first pretrained checkpoint (the demo's starts from it): a stock checkpoint,
    trained by jobs/pretrain_tiny.py with the stages of configs/pretrain-tiny.yaml (as its
    record says), on a data seed of its own."""
    from transformers import AutoConfig

    from jobs.pretrain_tiny import DEFAULT_STAGES

    record = json.loads((SHIPPED / "pretrain.json").read_text())
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert len(record["stages"]) == len(DEFAULT_STAGES)
    for stage, path in zip(record["stages"], DEFAULT_STAGES, strict=True):
        assert stage["stage"] == str(path.relative_to(REPO))
        shipped = load_config(path).model_dump(mode="json")
        if stage is not record["stages"][0]:  # from the stage before, wherever it was written
            shipped["model"]["name_or_path"] = stage["config"]["model"]["name_or_path"]
        # settings added to the typed config since the record was written (at their defaults)
        # are not in it; every setting it has must be what the stage's config says
        assert stage["config"] == _recorded_part(shipped, stage["config"])
        assert stage["config"]["data"]["synthetic"]["seed"] != demo.data.synthetic.seed
    assert AutoConfig.from_pretrained(SHIPPED).model_type == "llava"
    assert record["held_out"]["all"] >= 0.9, record["held_out"]


def test_the_demo_checkpoint_is_what_its_record_says():
    """The demo's start (checkpoints/tiny-grid3q): three runs of jobs/pretrain_tiny.py after
    checkpoints/tiny-grid3, whose recorded settings are those of the stage configs named in
    configs/pretrain-tiny-q1.yaml with the overrides of each run's command, on data seeds
    other than the demo's."""
    from transformers import AutoConfig

    shipped_dir = REPO / "checkpoints" / "tiny-grid3q"
    record = json.loads((shipped_dir / "pretrain.json").read_text())
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.model.name_or_path == "checkpoints/tiny-grid3q"
    configs = ["pretrain-tiny-q1.yaml", "pretrain-tiny-q1.yaml", "pretrain-tiny-q.yaml"]
    assert len(record["stages"]) == len(configs)
    first = record["stages"][0]["config"]["model"]["name_or_path"]
    assert first == "checkpoints/tiny-grid3"
    for stage, name in zip(record["stages"], configs, strict=True):
        words = stage["command"].split()
        assert words[words.index("--config") + 1] == f"configs/{name}"
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        shipped = load_config(REPO / "configs" / name, sets).model_dump(mode="json")
        shipped["model"]["name_or_path"] = stage["config"]["model"]["name_or_path"]
        assert stage["config"] == _recorded_part(shipped, stage["config"])
        assert stage["config"]["data"]["synthetic"]["seed"] != demo.data.synthetic.seed
    assert AutoConfig.from_pretrained(shipped_dir).model_type == "llava"
    assert record["held_out"]["all"] >= 0.9, record["held_out"]

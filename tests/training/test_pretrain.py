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


def test_a_stage_starts_from_a_resized_checkpoint(tmp_path):
    """--resize-input: the first stage trains the named checkpoint at the new size; the log
    starts with the command, the record names the source and the size."""
    from transformers import AutoConfig

    from jobs.pretrain_tiny import main

    out = tmp_path / "ckpt"
    main(["--config", str(REPO / "configs" / "pretrain-tiny-grid4.yaml"), "--resize-input", "64",
          "--out", str(out), "--eval-limit", "2", "--set", "train.max_steps=2",
          "--set", "data.synthetic.n_train=8", "--set", "data.synthetic.n_test=2"])  # fmt: skip
    record = json.loads((out / "pretrain.json").read_text())
    assert record["resized_input"] == 64 and record["resized_from"] == "checkpoints/tiny-grid3q"
    assert "--resize-input 64" in record["stages"][0]["command"]
    assert (out / "pretrain.log").read_text().startswith("$ python jobs/pretrain_tiny.py --config")
    assert AutoConfig.from_pretrained(out).vision_config.image_size == 64
    with pytest.raises(SystemExit):  # nothing saved to resize
        main(["--config", str(REPO / "configs" / "pretrain-tiny.yaml"), "--resize-input", "64",
              "--out", str(tmp_path / "no")])  # fmt: skip


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


@pytest.mark.parametrize("family", ["llava", "llava-1.5"])
def test_a_checkpoints_input_is_resized_with_its_positions_interpolated(tmp_path, family):
    """resize_llava_input: at the same size the weights are the same; larger, only the
    position table changes (CLIP's class position kept), the config and the image processor
    follow, and the stock model runs on the stock processor's inputs at the new size."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from gazeattn.tiny import build_stock, resize_llava_input

    stock = build_stock(tmp_path / "stock", family=family, image_size=48, patch_size=8)
    same = resize_llava_input(stock, tmp_path / "same", 48)
    before = LlavaForConditionalGeneration.from_pretrained(stock).state_dict()
    for key, value in LlavaForConditionalGeneration.from_pretrained(same).state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resize_llava_input(stock, tmp_path / "odd", 60)
    out = resize_llava_input(stock, tmp_path / "big", 64)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    after = model.state_dict()
    (key,) = [k for k in before if k.endswith("position_embedding.weight")]
    extra = 1 if family == "llava-1.5" else 0
    assert after[key].shape[0] == 64 + extra and torch.equal(
        after[key][:extra], before[key][:extra]
    )
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k != key)
    assert model.config.vision_config.image_size == 64
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 64
    image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert image_tokens == model.config.image_seq_length
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_the_4x4_checkpoint_is_what_its_record_says():
    """The claim benchmark's 4 x 4 grid starts from checkpoints/tiny-grid4q: the demo's
    checkpoint at 64 px, one stage of configs/pretrain-tiny-grid4.yaml (its command in the
    record), on a data seed none of the claim's seeds uses."""
    from transformers import AutoConfig

    from bench.claim import GRID4

    shipped_dir = REPO / "checkpoints" / "tiny-grid4q"
    assert f"model.name_or_path={shipped_dir.relative_to(REPO)}" in GRID4
    record = json.loads((shipped_dir / "pretrain.json").read_text())
    (stage,) = record["stages"]
    assert record["resized_input"] == 64 and "--resize-input 64" in stage["command"]
    assert stage["stage"] == "configs/pretrain-tiny-grid4.yaml"
    shipped = load_config(REPO / stage["stage"]).model_dump(mode="json")
    assert shipped["model"]["name_or_path"] == record["resized_from"] == "checkpoints/tiny-grid3q"
    shipped["model"]["name_or_path"] = stage["config"]["model"]["name_or_path"]  # the copy
    assert stage["config"] == _recorded_part(shipped, stage["config"])
    assert stage["config"]["data"]["synthetic"]["seed"] not in (0, 1, 2)
    config = AutoConfig.from_pretrained(shipped_dir)
    assert config.model_type == "llava" and config.vision_config.image_size == 64
    assert record["held_out"]["all"] >= 0.9, record["held_out"]

"""A rerun of a run name resumes its checkpoints only with the configuration that wrote them
(the driver's check, before Ray starts), and a new start of a name prepares its model again
when the model settings changed."""

from __future__ import annotations

import json

import pytest

from tracking.storage import open_location
from training.checkpointing import RUN_RECORD, ResumeMismatch, check_resume
from training.config import load_config
from training.trainer import GAZE_INIT, TINY_BASE, _forget_prepared


def _cfg(*sets: str):
    return load_config("configs/demo.yaml", list(sets))


def _with_checkpoint(run):
    (run / "checkpoint_2026-12-03_10-00-00.000000").mkdir(parents=True)


def test_a_changed_configuration_is_refused_naming_each_change(tmp_path):
    run = open_location(tmp_path / "run")
    assert check_resume(_cfg(), run) == []
    _with_checkpoint(tmp_path / "run")
    with pytest.raises(ResumeMismatch) as err:
        check_resume(_cfg("optim.lr=0.5", "model.gaze.keep_ratio=0.5"), run)
    text = str(err.value)
    assert "optim.lr: 0.001 -> 0.5" in text
    assert "model.gaze.keep_ratio: 0.2 -> 0.5" in text
    assert "--set run.name=" in text and str(tmp_path / "run") in text
    # the refused configuration did not replace the record
    assert check_resume(_cfg(), run) == []


def test_a_resume_may_go_on_longer_and_report_differently(tmp_path):
    run = open_location(tmp_path / "run")
    check_resume(_cfg(), run)
    _with_checkpoint(tmp_path / "run")
    later = _cfg("train.max_steps=9999", "train.log_every=7", "mlflow.enabled=false")
    assert check_resume(later, run) == []
    recorded = json.loads((tmp_path / "run" / RUN_RECORD).read_text())["config"]
    assert recorded["train"]["max_steps"] == 9999


def test_checkpoints_without_a_record_resume_with_a_note(tmp_path, capsys):
    _with_checkpoint(tmp_path / "run")
    assert check_resume(_cfg("optim.lr=0.5"), open_location(tmp_path / "run")) == []
    assert "predate" in capsys.readouterr().out
    assert (tmp_path / "run" / RUN_RECORD).is_file()


def test_a_new_start_with_other_model_settings_prepares_its_model_again(tmp_path):
    run = open_location(tmp_path / "run")
    check_resume(_cfg(), run)
    for name in (TINY_BASE, GAZE_INIT):
        (tmp_path / "run" / name).mkdir()
    # no checkpoints: a new start, whose changes come back
    changes = check_resume(_cfg("train.seed=3"), run)
    assert [c.split(":")[0] for c in changes] == ["train.seed"]
    _forget_prepared(run, changes)
    assert (tmp_path / "run" / GAZE_INIT).is_dir()
    # compared with the record the seed-3 start left
    changes = check_resume(_cfg("train.seed=3", "model.gaze.num_context_tokens=4"), run)
    assert [c.split(":")[0] for c in changes] == ["model.gaze.num_context_tokens"]
    _forget_prepared(run, changes)
    assert not (tmp_path / "run" / GAZE_INIT).exists()
    assert not (tmp_path / "run" / TINY_BASE).exists()


def test_the_job_stops_with_the_changes_before_ray_starts(tmp_path, capsys):
    from jobs.finetune import main

    storage = f"run.storage_path={tmp_path}"
    check_resume(_cfg(storage), open_location(tmp_path / "gaze-demo"))
    _with_checkpoint(tmp_path / "gaze-demo")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/demo.yaml", "--set", storage, "--set", "optim.lr=0.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.5" in err and "--set run.name=" in err

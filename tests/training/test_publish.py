"""Publishing a model directory is whole or not at all: it goes to a temporary prefix first and
its manifest (every file with its size) is written last; readers key their caches on the
manifest, and a conversion that did not finish is done again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tracking import storage
from tracking.storage import MANIFEST, copy_dir, is_complete, local_copy, open_location
from training.config import load_config


def _model(path: Path, version: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"v": version}))
    (path / "model.safetensors").write_bytes(bytes([version]) * 64)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(params=["local", "memory"])
def dest(request, tmp_path):
    if request.param == "local":
        return open_location(tmp_path / "published" / "export")
    # fsspec's in-memory filesystem stands in for an object store
    return open_location(f"memory://bucket/{tmp_path.name}/export")


def _read(location, name: str) -> bytes:
    with location.filesystem.open_input_stream(location.join(name).path) as f:
        return f.read()


def test_a_failed_copy_leaves_the_old_export_whole(tmp_path, dest, monkeypatch):
    copy_dir(open_location(_model(tmp_path / "v1", 1)), dest)
    assert is_complete(dest)
    real = pafs.copy_files

    def fails_midway(source, destination, **kwargs):
        real(source, destination, **kwargs)
        raise OSError("the connection dropped")

    monkeypatch.setattr(pafs, "copy_files", fails_midway)
    with pytest.raises(OSError, match="connection dropped"):
        copy_dir(open_location(_model(tmp_path / "v2", 2)), dest)
    monkeypatch.undo()
    assert json.loads(_read(dest, "config.json")) == {"v": 1}
    assert _read(dest, "model.safetensors") == bytes([1]) * 64
    assert is_complete(dest)
    # and nothing of the failed copy is left beside it
    parent = dest.path.rsplit("/", 1)[0]
    listed = dest.filesystem.get_file_info(pafs.FileSelector(parent))
    assert [info.base_name for info in listed] == ["export"]


def test_the_manifest_lists_every_file_and_is_written_last(tmp_path, dest):
    copy_dir(open_location(_model(tmp_path / "v1", 1)), dest)
    manifest = json.loads(_read(dest, MANIFEST))
    assert manifest["files"] == {"config.json": 8, "model.safetensors": 64, "sub/tokenizer.json": 2}
    # a file that differs from its manifest entry: not complete
    with dest.filesystem.open_output_stream(dest.join("model.safetensors").path) as f:
        f.write(b"cut")
    assert not is_complete(dest)


def test_a_copy_taken_mid_export_is_not_served_for_ever(tmp_path, monkeypatch):
    monkeypatch.setenv("GAZEATTN_CACHE", str(tmp_path / "cache"))
    remote = open_location(f"memory://bucket/{tmp_path.name}/export")
    fs = remote.filesystem
    fs.create_dir(remote.path, recursive=True)
    # an export caught half-written: its config.json before its weights
    with fs.open_output_stream(remote.join("config.json").path) as f:
        f.write(b'{"v": 1}')
    early = local_copy(remote.uri)
    assert not (early / "model.safetensors").exists()
    # the weights arrive (config.json untouched), then the manifest, last
    with fs.open_output_stream(remote.join("model.safetensors").path) as f:
        f.write(b"\1" * 64)
    later = local_copy(remote.uri)
    assert (later / "model.safetensors").read_bytes() == b"\1" * 64
    storage.write_manifest(remote)
    published = local_copy(remote.uri)
    assert (published / "model.safetensors").read_bytes() == b"\1" * 64
    assert local_copy(remote.uri) == published


def test_an_unfinished_conversion_is_done_again(tmp_path):
    from training.trainer import prepare_model, storage_root

    cfg = load_config(None, ["run.name=convert", f"run.storage_path={tmp_path / 'runs'}"])
    root = storage_root(cfg)
    # a conversion that stopped after transformers wrote config.json, before the weights
    partial = Path(root.join("convert", "gaze-init").path)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text('{"model_type": "llava"}')
    path = Path(prepare_model(cfg, root))
    assert (path / "model.safetensors").is_file()
    assert is_complete(open_location(path))
    # a finished conversion is used as it is
    stamp = (path / MANIFEST).read_text()
    assert Path(prepare_model(cfg, root)) == path and (path / MANIFEST).read_text() == stamp


def test_a_file_too_large_for_a_server_copy_is_streamed(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "SERVER_COPY_MAX", 16)
    dest = open_location(f"memory://bucket/{tmp_path.name}/export")
    copy_dir(open_location(_model(tmp_path / "v1", 1)), dest)
    assert _read(dest, "model.safetensors") == bytes([1]) * 64 and is_complete(dest)

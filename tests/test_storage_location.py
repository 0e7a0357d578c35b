"""Storage locations without a server: local paths, fsspec's in-memory filesystem, the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracking.storage import StorageError, check_writable, local_copy, open_location, upload_dir


def test_a_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = open_location("outputs/ray")
    assert location.is_local and location.path == str(tmp_path / "outputs" / "ray")
    assert check_writable("outputs/ray", "run.storage_path").exists()


def test_an_unknown_scheme_names_the_uri():
    with pytest.raises(StorageError, match="nosuchscheme://bucket/x"):
        open_location("nosuchscheme://bucket/x")


def test_local_copy_of_a_remote_model_is_cached_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("GAZEATTN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"v": 1}')
    (model / "weights.bin").write_bytes(b"\0" * 10)
    # pyarrow does not know memory://; fsspec does
    remote = open_location("memory://bucket/models/tiny")
    assert not remote.is_local
    upload_dir(model, remote)
    first = local_copy(remote.uri)
    assert first.is_relative_to(tmp_path / "cache") and (first / "weights.bin").stat().st_size == 10
    assert local_copy(remote.uri) == first
    (model / "config.json").write_text('{"v": 22}')
    upload_dir(model, remote)
    again = local_copy(remote.uri)
    assert again != first and (again / "config.json").read_text() == '{"v": 22}'
    with pytest.raises(FileNotFoundError, match="no config.json"):
        local_copy("memory://bucket/models/none")
    assert local_copy(str(model)) == Path(model)

"""Where checkpoints, exports and models live: a local directory or an object-store URI.

Any URI pyarrow opens (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``), else one
that fsspec knows (``abfs://...``, with its package installed), as Ray Train's own
storage does. Credentials and endpoints come from the usual environment of each
filesystem: for S3, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION`` and,
for an S3-compatible store, ``AWS_ENDPOINT_URL`` (the processes of a Ray job inherit the
driver's environment locally; on a cluster, give them in the job's ``runtime_env``).

Models on object storage are used through a local copy (``local_copy``): downloaded once
per node into a cache directory (``$GAZEATTN_CACHE``, default ``~/.cache/gazeattn``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """A storage location that cannot be opened, read or written; the message names it."""


@dataclass(frozen=True)
class Location:
    """A directory in a filesystem: ``filesystem`` and the ``path`` inside it; ``uri`` to show."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(filesystem=self.filesystem, path=path, uri=uri)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self.filesystem.get_file_info(self.join(name).path).type == pafs.FileType.File


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def open_location(uri: str | Path) -> Location:
    """The filesystem and path of ``uri`` (a local path is made absolute); nothing is checked."""
    text = str(uri)
    if not is_uri(text) or text.startswith("file://"):
        local = Path(text.removeprefix("file://")).expanduser().resolve()
        return Location(filesystem=pafs.LocalFileSystem(), path=str(local), uri=str(local))
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except ValueError as err:  # pyarrow.ArrowInvalid: a scheme pyarrow does not know
        filesystem, path = _fsspec(text, err)
    except OSError as err:
        raise StorageError(f"cannot open {text}: {err}") from err
    return Location(filesystem=filesystem, path=path.rstrip("/"), uri=text.rstrip("/"))


def _fsspec(uri: str, arrow_error: Exception) -> tuple[pafs.FileSystem, str]:
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise StorageError(
            f"cannot open {uri}: pyarrow does not know it ({arrow_error}) nor fsspec ({err})"
        ) from err
    return PyFileSystem(FSSpecHandler(fs)), path


def check_writable(uri: str | Path, what: str) -> Location:
    """``uri`` opened and its directory created (so a missing bucket, bad credentials or an
    unreachable endpoint fail here, at submission, naming ``what``)."""
    try:
        location = open_location(uri)
        location.filesystem.create_dir(location.path, recursive=True)
    except (OSError, ValueError) as err:
        raise StorageError(f"{what} {uri}: cannot write there: {err}") from err
    return location


def upload_dir(local: str | Path, dest: Location) -> None:
    """Copy the local directory ``local`` to ``dest`` (replacing what is there)."""
    if dest.exists():
        dest.filesystem.delete_dir(dest.path)
    dest.filesystem.create_dir(dest.path, recursive=True)
    pafs.copy_files(
        str(Path(local).resolve()),
        dest.path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=dest.filesystem,
    )


def copy_dir(src: Location, dest: Location) -> None:
    """Copy a directory between (possibly different) filesystems, replacing ``dest``."""
    if dest.exists():
        dest.filesystem.delete_dir(dest.path)
    dest.filesystem.create_dir(dest.path, recursive=True)
    pafs.copy_files(
        src.path,
        dest.path,
        source_filesystem=src.filesystem,
        destination_filesystem=dest.filesystem,
    )


def cache_root() -> Path:
    return Path(os.environ.get("GAZEATTN_CACHE", Path.home() / ".cache" / "gazeattn"))


def local_copy(uri: str | Path, *, marker: str = "config.json") -> Path:
    """A local directory with the contents of ``uri``: the path itself when local, else a copy
    in the cache (downloaded once; concurrent callers on one node share it). ``marker`` is a
    file the directory must hold (a model's config.json)."""
    location = open_location(uri)
    if location.is_local:
        path = Path(location.path)
        if not (path / marker).is_file():
            raise FileNotFoundError(f"{uri}: no {marker} in this directory")
        return path
    info = location.filesystem.get_file_info(location.join(marker).path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no {marker} there")
    # a new upload to the same URI (a rerun's export) is a new copy
    digest = hashlib.sha256(f"{location.uri} {info.mtime_ns} {info.size}".encode()).hexdigest()
    out = cache_root() / "models" / f"{Path(location.path).name}-{digest[:16]}"
    if (out / marker).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        pafs.copy_files(
            location.path,
            str(tmp),
            source_filesystem=location.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        try:
            os.rename(tmp, out)
        except OSError:
            # another process of this node finished the same download first
            if not (out / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

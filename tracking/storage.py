"""Where checkpoints, exports and models live: a local directory or an object-store URI.

Any URI pyarrow opens (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``), else one
that fsspec knows (``abfs://...``, with its package installed), as Ray Train's own
storage does. Credentials and endpoints come from the usual environment of each
filesystem: for S3, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION`` and,
for an S3-compatible store, ``AWS_ENDPOINT_URL`` (the processes of a Ray job inherit the
driver's environment locally; on a cluster, give them in the job's ``runtime_env``).

Directories are published whole (``copy_dir``, ``publish``): built under a temporary prefix
beside their place, then put there with a manifest (``MANIFEST``: every file and its size)
written last, so a directory without its manifest is unfinished (``is_complete``).

Models on object storage are used through a local copy (``local_copy``): downloaded once
per node, and again for each new publication, into a cache directory (``$GAZEATTN_CACHE``,
default ``~/.cache/gazeattn``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

# written last into a published directory: every other file with its size, and an id that
# tells one publication from the next (caches are keyed on it)
MANIFEST = "gazeattn-manifest.json"


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
    """Publish the local directory ``local`` at ``dest`` (``copy_dir``)."""
    copy_dir(open_location(local), dest)


def copy_dir(src: Location, dest: Location) -> None:
    """Publish a copy of ``src`` (any filesystem) at ``dest``, replacing what is there.

    The copy goes to a temporary prefix beside ``dest`` first: a copy that fails leaves the
    old ``dest`` as it was. Then ``publish`` puts it in place, its manifest last."""
    staged = staging_location(dest)
    try:
        staged.filesystem.create_dir(staged.path, recursive=True)
        pafs.copy_files(
            src.path,
            staged.path,
            source_filesystem=src.filesystem,
            destination_filesystem=staged.filesystem,
        )
        publish(staged, dest)
    finally:
        _remove(staged)


def _remove(location: Location) -> None:
    """Delete a temporary prefix if it is there; a failure to is logged, not raised (it
    would hide the error that left it behind)."""
    try:
        if location.exists():
            location.filesystem.delete_dir(location.path)
    except OSError as err:
        log.warning("could not delete the temporary %s: %s", location.uri, err)


def staging_location(dest: Location) -> Location:
    """A new temporary prefix beside ``dest``, on its filesystem, to build a publication in."""
    tag = f".partial-{uuid.uuid4().hex[:12]}"
    return Location(filesystem=dest.filesystem, path=dest.path + tag, uri=dest.uri + tag)


def publish(staged: Location, dest: Location) -> None:
    """Put the complete directory ``staged`` (on ``dest``'s filesystem, e.g. a
    ``staging_location``) at ``dest``, with its manifest: a reader sees the old publication,
    the new one, or one without a manifest (unfinished), never a mix that claims to be whole.

    Locally by renames; on an object store, which cannot rename a prefix, ``dest``'s manifest
    is deleted first and the new one written after every other file."""
    write_manifest(staged)
    fs = dest.filesystem
    if dest.is_local:
        old = Path(dest.path + f".old-{uuid.uuid4().hex[:12]}")
        moved = dest.exists()
        if moved:
            os.rename(dest.path, old)
        os.rename(staged.path, dest.path)
        if moved:
            shutil.rmtree(old, ignore_errors=True)
        return
    if dest.exists():
        if dest.is_file(MANIFEST):
            fs.delete_file(dest.join(MANIFEST).path)
        fs.delete_dir(dest.path)
    fs.create_dir(dest.path, recursive=True)
    sizes = _listing(staged)
    for name in [*sizes, MANIFEST]:
        target = dest.join(name)
        fs.create_dir(target.path.rsplit("/", 1)[0], recursive=True)
        _copy_file(fs, staged.join(name).path, target.path, sizes.get(name, 0))


# S3's server-side copy (CopyObject, what pyarrow's copy_file does) takes at most 5 GB
SERVER_COPY_MAX = 4 << 30


def _copy_file(fs: pafs.FileSystem, src: str, dest: str, size: int) -> None:
    """One file copied inside ``fs``: on the server when it can, else streamed through here
    (an output stream on S3 is a multipart upload, without the size limit)."""
    if size <= SERVER_COPY_MAX:
        fs.copy_file(src, dest)
        return
    with fs.open_input_stream(src) as reader, fs.open_output_stream(dest) as writer:
        while chunk := reader.read(64 << 20):
            writer.write(chunk)


def cache_root() -> Path:
    return Path(os.environ.get("GAZEATTN_CACHE", Path.home() / ".cache" / "gazeattn"))


def local_copy(uri: str | Path, *, marker: str = "config.json", attempts: int = 3) -> Path:
    """A local directory with the contents of ``uri``: the path itself when local, else a copy
    in the cache (downloaded once; concurrent callers on one node share it). ``marker`` is a
    file the directory must hold (a model's config.json).

    The cache is keyed on the publication's manifest (``publish``), or for a directory
    without one (not published by us) on its whole listing with sizes and times, so a copy
    taken while a directory was being written is not used once it has changed. A copy is
    kept only when the source did not change while it was taken (else tried again, up to
    ``attempts`` times)."""
    location = open_location(uri)
    if location.is_local:
        path = Path(location.path)
        if not (path / marker).is_file():
            raise FileNotFoundError(f"{uri}: no {marker} in this directory")
        return path
    for _ in range(attempts):
        if not location.is_file(marker):
            raise FileNotFoundError(f"{uri}: no {marker} there")
        version = _version(location)
        # a new publication at the same URI (a rerun's export) is a new copy
        digest = hashlib.sha256(f"{location.uri} {version}".encode()).hexdigest()
        out = cache_root() / "models" / f"{Path(location.path).name}-{digest[:16]}"
        if (out / marker).is_file() or _download(location, out, marker, version):
            return out
    raise StorageError(f"{uri} changed each time it was copied ({attempts} times); try later")


def _version(location: Location) -> str:
    """What identifies the contents of ``location``: its manifest, else its listing."""
    manifest = read_manifest(location)
    if manifest is not None:
        return manifest.decode()
    infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    return json.dumps(sorted((i.path, i.size, i.mtime_ns) for i in infos if i.size is not None))


def _download(location: Location, out: Path, marker: str, version: str) -> bool:
    """Copy ``location`` to ``out`` (by rename, whole); False when it changed meanwhile."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        pafs.copy_files(
            location.path,
            str(tmp),
            source_filesystem=location.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        if _version(location) != version or not _matches_manifest(tmp):
            return False
        try:
            os.rename(tmp, out)
        except OSError:
            # another process of this node finished the same download first
            if not (out / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _matches_manifest(local: Path) -> bool:
    """Whether a local copy holds every file of its manifest with its size (True without one)."""
    manifest = local / MANIFEST
    if not manifest.is_file():
        return True
    files = json.loads(manifest.read_text())["files"]
    return all(
        (local / name).is_file() and (local / name).stat().st_size == size
        for name, size in files.items()
    )


def _listing(location: Location) -> dict[str, int]:
    """Every file under ``location`` (relative path -> size), the manifest left out."""
    infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    base = location.path.rstrip("/") + "/"
    files = {
        info.path.removeprefix(base): info.size for info in infos if info.type == pafs.FileType.File
    }
    files.pop(MANIFEST, None)
    return files


def write_manifest(location: Location) -> dict:
    """Mark ``location`` complete: its manifest, listing every file under it with its size."""
    manifest = {"id": uuid.uuid4().hex, "files": dict(sorted(_listing(location).items()))}
    with location.filesystem.open_output_stream(location.join(MANIFEST).path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(location: Location) -> bytes | None:
    """The manifest's bytes, or None when ``location`` has none (not ours, or unfinished)."""
    try:
        with location.filesystem.open_input_stream(location.join(MANIFEST).path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def is_complete(location: Location) -> bool:
    """Whether ``location`` holds a finished publication: a manifest whose every file is
    there with its size."""
    data = read_manifest(location)
    if data is None:
        return False
    listed = _listing(location)
    return all(listed.get(name) == size for name, size in json.loads(data)["files"].items())

"""Filesystem access for local paths and URIs (``s3://...``), and atomic writes.

Everything segpipe reads or writes goes through a ``pyarrow.fs.FileSystem`` so that a folder
and a bucket behave alike. Files are written under a temporary name and renamed into place, so
a reader (or a rerun) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from typing import IO, Any, Iterator

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and path for a local path or URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/``, as every pyarrow filesystem expects."""
    return posixpath.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(fs: pafs.FileSystem, path: str, suffix: str = "") -> list[pafs.FileInfo]:
    """Return the files under ``path`` (recursively) whose name ends with ``suffix``, sorted."""
    if not is_dir(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)),
        key=lambda i: i.path,
    )


#: Ends the name of every file still being written (see ``temporary_name``).
TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: str) -> str:
    """A sibling name for writing ``path`` before it is renamed into place."""
    directory, name = posixpath.split(path)
    return posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing; it appears under its name only if the block succeeds."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = temporary_name(path)
    try:
        with fs.open_output_stream(tmp) as stream:
            yield stream
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with atomic_output(fs, path) as stream:
        stream.write(data)


def write_json_atomic(folder: str, name: str, value: Any) -> None:
    """Write ``value`` as indented UTF-8 JSON to ``folder/name`` (a path or URI), atomically."""
    fs, root = resolve(folder.rstrip("/"))
    data = json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
    write_bytes_atomic(fs, join(root, name), data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()

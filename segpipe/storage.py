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
import re
import uuid
from typing import IO, Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe.config import ConfigError


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and path for a local path or URI; a URI pyarrow cannot use is a
    ``ConfigError`` that names it (without its credentials)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as exc:
            raise ConfigError(f"cannot use {redact(uri)}: {redact(str(exc))}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def split_options(uri: str) -> tuple[str, str]:
    """``scheme://bucket/path`` and its ``?options`` apart (``""`` when there are none); a
    local path has no options, whatever characters it holds."""
    if "://" in uri and "?" in uri:
        head, _, options = uri.partition("?")
        return head, "?" + options
    return uri, ""


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/``, as every pyarrow filesystem expects; a URI's ``?options``
    stay at its end (``s3://b/out?scheme=http`` + ``predictions`` →
    ``s3://b/out/predictions?scheme=http``)."""
    head, options = split_options(base)
    return posixpath.join(head, *parts) + options


#: A URI's user info (``scheme://KEY:SECRET@``) and the query options that carry secrets.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#'\"]+@")
_SECRET_OPTION = re.compile(
    r"([?&][A-Za-z0-9_.-]*(?:secret|password|passwd|token|access_key|credential|signature)"
    r"[A-Za-z0-9_.-]*=)[^&\s'\"#]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``: user info
    (``s3://KEY:SECRET@bucket``) and secret-like options (``secret_key=``, ``access_key=``,
    ``session_token=``, ``password=``...). Everything segpipe prints or writes passes here."""
    return _SECRET_OPTION.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


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
def atomic_output(fs: pafs.FileSystem, path: str,
                  before_commit: Optional[Callable[[], None]] = None) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing; it appears under its name only if the block succeeds (and
    ``before_commit``, called just before the rename, does not raise)."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = temporary_name(path)
    try:
        with fs.open_output_stream(tmp) as stream:
            yield stream
        if before_commit is not None:
            before_commit()
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
    fs, root = resolve(folder)
    data = redact(json.dumps(value, indent=2, ensure_ascii=False)).encode("utf-8") + b"\n"
    write_bytes_atomic(fs, join(root, name), data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()

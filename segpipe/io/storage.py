"""Filesystem access for local paths and URIs (``s3://...``), and atomic writes.

Everything segpipe reads or writes goes through a ``pyarrow.fs.FileSystem`` so that a folder
and a bucket behave alike. Files are written under a temporary name and renamed into place, so
a reader (or a rerun) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import socket
import urllib.parse
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


def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers may run in another folder than the caller);
    a URI as it is."""
    return uri if "://" in uri else os.path.abspath(uri)


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


#: A URI's user info (``scheme://KEY:SECRET@``).
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#'\"]+@")
#: A URI with a query: ``scheme://...?query`` up to white space, a quote or an angle bracket.
_URI_QUERY = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>?]*\?)([^\s'\"<>]*)")
#: Query parameters that carry secrets in the URLs users meet: signatures and credentials of
#: presigned and SAS URLs (AWS ``X-Amz-Signature``/``-Credential``/``-Security-Token``, GCS
#: ``X-Goog-Signature``/``Signature``/``GoogleAccessId``, Azure SAS ``sig``, CloudFront
#: ``Signature``/``Policy``/``Key-Pair-Id``), API keys and tokens (``key``, ``api_key``,
#: ``access_token``, ``code``), pyarrow's ``access_key``/``secret_key``/``session_token``.
_SECRET_PARAMETER = re.compile(
    r"(?:x-amz-|x-goog-|.*(?:secret|passw|token|credential|signature|key|auth)|sig|policy"
    r"|googleaccessid|code|pwd)[A-Za-z0-9_.-]*", re.IGNORECASE)


def _redact_query(match: re.Match) -> str:
    head, query = match.group(1), match.group(2)
    query, hash_, fragment = query.partition("#")
    parameters = []
    for parameter in query.split("&"):
        name, equals, value = parameter.partition("=")
        secret = equals and value and _SECRET_PARAMETER.fullmatch(urllib.parse.unquote(name))
        parameters.append(f"{name}=***" if secret else parameter)
    return head + "&".join(parameters) + hash_ + fragment


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``: user info
    (``s3://KEY:SECRET@bucket``) and the values of secret-carrying query parameters
    (``_SECRET_PARAMETER``: signed URLs' signatures and credentials, API keys, tokens,
    pyarrow's ``secret_key=``...). Only the query of a URI is touched, so a file name such as
    ``err&token=1.jpg`` stays as it is. Everything segpipe prints or writes passes here."""
    return _URI_QUERY.sub(_redact_query, _USERINFO.sub(r"\1***@", text))


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


def host_tag() -> str:
    """Six hex digits naming this host in temporary names (``segpipe.ownership`` tells a
    temporary file of a process gone on this host by them)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def temporary_name(path: str) -> str:
    """A sibling name for writing ``path`` before it is renamed into place:
    ``.NAME.PID-HOST-RANDOM.tmp``, so that what a killed writer left can be told."""
    directory, name = posixpath.split(path)
    if len(name.encode("utf-8", "surrogateescape")) > 200:   # a disk allows 255 bytes a name
        name = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return posixpath.join(directory, f".{name}.{os.getpid()}-{host_tag()}-"
                                     f"{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")


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

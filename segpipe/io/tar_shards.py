"""Tar shards (WebDataset style) as input: each shard read as a stream with Python's
``tarfile``, one source row per image member named ``<shard>/<member>``; a damaged shard costs
only what follows the damage. An entry of ``formats.INPUT_FORMATS``."""

from __future__ import annotations

import posixpath
from typing import IO, Any, Iterator, Optional, cast

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe.io import storage
from segpipe.io.sources import (
    READ_CUT,
    ReadOptions,
    is_image_name,
    relative_name,
    safe_file_name,
    source_table,
)


class _TailKeepingReader:
    """A file object that remembers the last bytes read through it, so that after Python's
    ``tarfile`` stops, the end-of-archive marker (two zero blocks) can be checked: ``tarfile``
    ends silently at a file cut between or inside headers."""

    KEEP = 1 << 16

    def __init__(self, stream):
        self.stream, self.consumed, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.consumed += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def has_end_marker(self, offset: int) -> bool:
        """True when two zero blocks follow the last member (which ends at ``offset``).
        ``tarfile`` reads in records of 10,240 bytes and stops at the first zero block: when
        that block ends a record, the second is not read yet, so it is read here."""
        missing = offset + 1024 - self.consumed
        if missing > 0:
            self.read(missing)
        start = offset - (self.consumed - len(self.tail))
        return 0 <= start and len(self.tail) >= start + 1024 and \
            not any(self.tail[start:start + 1024])


def tar_images(fs: pafs.FileSystem, path: str,
               shard: str) -> Iterator[tuple[Optional[str], Optional[bytes]]]:
    """Stream the tar shard at ``path`` (named ``shard`` in file names): ``(name, bytes)`` for
    each image member, ``(None, None)`` for each other file member; raises where the shard is
    damaged (``tarfile.TarError``, ``OSError``...), after what came before it."""
    import tarfile

    seen: set[str] = set()   # names given so far in this shard
    with fs.open_input_stream(path) as raw:
        reader = _TailKeepingReader(raw)
        # a stream ("r|") only reads: the reader has no seek or write, which typeshed asks of
        # every file object tarfile takes
        with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if not is_image_name(member.name):
                    yield None, None
                    continue
                extracted = tar.extractfile(member)   # a file member: never None
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield f"{shard}/{_unique(safe_file_name(member.name), seen)}", data
            if not reader.has_end_marker(tar.offset):
                raise tarfile.ReadError("no end-of-archive marker: the file ends early")


def _unique(name: str, seen: set[str]) -> str:
    """``name``, or for a member name the shard held already (a tar may hold one name
    twice), ``<stem>-2<ext>``, ``-3``... : the first not given yet, in member order."""
    stem, ext = posixpath.splitext(name)
    given, k = name, 1
    while given in seen:
        k += 1
        given = f"{stem}-{k}{ext}"
    seen.add(given)
    return given


def read_tar_shards(batch: pa.Table, options: ReadOptions, done: frozenset[int],
                    monitor: Optional[Any] = None) -> pa.Table:
    """Ray Data stage: each row names a tar shard (``path``); read it with Python's ``tarfile``
    as a stream (``tar_images``) and return one row per image member, named
    ``<shard>/<member>`` (a member name the shard held already: ``<shard>/<stem>-2<ext>``).

    A shard that cannot be read to its end (truncated in a member or a header, cut at a member
    boundary without the end-of-archive marker, not a tar at all) keeps the rows of every
    member read before the damage and adds one error row named after the shard, saying where
    it stopped; other shards are not affected. Members without an image extension (captions,
    JSON, class files) are counted, through ``monitor``, as skipped.
    """
    import tarfile

    fs, _ = storage.resolve(options.input_uri)
    names: list[str] = []
    datas: list[Optional[bytes]] = []
    errors: list[Optional[str]] = []
    skipped = 0
    for path in batch.column("path").to_pylist():
        shard = safe_file_name(relative_name(path, options.root))
        members = 0
        try:
            for name, data in tar_images(fs, path, shard):
                members += 1
                if name is None:
                    skipped += 1
                    continue
                names.append(name)
                datas.append(data)
                errors.append(None)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            names.append(shard)
            datas.append(None)
            errors.append(f"shard {READ_CUT}: {str(exc) or type(exc).__name__} (after {members} "
                          "members; the members after that are not in the run)")
    if monitor is not None and skipped:
        monitor.add_skipped.remote("tar members without an image extension", skipped)
    return source_table(names, datas, done, errors)


def images_of(fs: pafs.FileSystem, path: str, shard: str,
              options: ReadOptions) -> Iterator[tuple[Optional[str], Optional[bytes]]]:
    """``(name, bytes)`` of each image member of one shard (``render``)."""
    return tar_images(fs, path, shard)

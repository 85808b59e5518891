"""Parquet tables with an image column as input (Hugging Face datasets' ``Image`` columns
included): read row group by row group with pyarrow, one source row per table row, named by
``--name-column`` or ``<table>#<hash>``; a damaged table costs only what follows the damage.
An entry of ``formats.INPUT_FORMATS``.

Every row gets a name of its own, as ``file_name`` and ``image_id`` must be: the same bytes
again in a table (a dataset's duplicate pictures) are named ``<table>#<hash>-2``, ``-3``...
in row order, and a ``--name-column`` that gives one name to two rows, in one table or in
two, is refused before any work (``check_columns``)."""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe.config import ConfigError
from segpipe.io import storage
from segpipe.io.sources import READ_CUT, ReadOptions, relative_name, safe_file_name, source_table


def image_bytes(value: object) -> bytes:
    """The encoded image in an image-column value: bytes, or a Hugging Face ``Image`` struct
    (``{"bytes": ..., "path": ...}``); ``ValueError`` for anything else (a number, a text)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"the image column holds a {type(value).__name__}, not image bytes")


def table_images(fs: pafs.FileSystem, path: str, table: str, image_column: str,
                 name_column: Optional[str]
                 ) -> Iterator[tuple[str, Optional[bytes], Optional[str]]]:
    """Read the Parquet table at ``path`` (named ``table`` in file names) row group by row
    group: ``(name, bytes, None)`` per row, or ``(name, None, reason)`` for a value that is not
    image bytes. The name is ``name_column``'s value, or ``<table>#<BLAKE2b of the bytes>``.
    Raises where the table cannot be read (``OSError``, ``pa.ArrowException``, ``ValueError``
    for a missing column), after the rows that came before."""
    import pyarrow.parquet as pq

    columns = [image_column] + ([name_column] if name_column else [])
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"no column {', '.join(map(repr, missing))}")
        rows = 0
        repeats: dict[str, int] = {}   # hash names given so far, and how often
        for group in range(parquet.num_row_groups):
            part = parquet.read_row_group(group, columns=columns)
            given = (part.column(name_column).to_pylist() if name_column
                     else [None] * part.num_rows)
            for value, name in zip(part.column(image_column).to_pylist(), given):
                try:
                    data, error = image_bytes(value), None
                except ValueError as exc:
                    data, error = None, str(exc)
                if name is not None:
                    name = safe_file_name(str(name))
                elif data is not None:
                    name = f"{table}#{hashlib.blake2b(data, digest_size=8).hexdigest()}"
                    repeats[name] = seen = repeats.get(name, 0) + 1
                    name += f"-{seen}" if seen > 1 else ""
                else:
                    name = f"{table}#row{rows}"
                rows += 1
                yield name, data, error


def read_image_tables(batch: pa.Table, options: ReadOptions, done: frozenset[int],
                      monitor: Optional[object] = None) -> pa.Table:
    """Ray Data stage: each row names a Parquet table (``path``); return one row per table
    row (``table_images``).

    A value of the image column that is not image bytes becomes that row's error. A table that
    cannot be read to its end (not Parquet, corrupt, without the named columns) keeps the rows
    of the row groups read before and adds one error row named after the table; other tables
    are not affected.
    """
    fs, _ = storage.resolve(options.input_uri)
    names: list[str] = []
    datas: list[Optional[bytes]] = []
    errors: list[Optional[str]] = []
    for path in batch.column("path").to_pylist():
        table = safe_file_name(relative_name(path, options.root))
        rows = 0
        try:
            for name, data, error in table_images(fs, path, table, options.image_column, options.name_column):
                names.append(name)
                datas.append(data)
                errors.append(error)
                rows += 1
        except (OSError, pa.ArrowException, ValueError) as exc:
            names.append(table)
            datas.append(None)
            errors.append(f"table {READ_CUT}: {exc} (after {rows} rows; the rows after that "
                          "are not in the run)")
    return source_table(names, datas, done, errors)


def check_columns(paths: list[str], options: ReadOptions) -> None:
    """Fail before any work when the tables lack the named columns, or when the name column
    gives one name to two rows (in one table or in two: ``file_name`` and ``image_id`` must
    name one image). Reads the name column alone; a table that cannot be read is left to
    the run, which makes it an error row."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(options.input_uri)
    with fs.open_input_file(paths[0]) as f:
        names = pq.read_schema(f).names
    for flag, column in (("--image-column", options.image_column), ("--name-column", options.name_column)):
        if column and column not in names:
            raise ConfigError(f"{flag} {column!r} is not a column of {paths[0]} "
                              f"(columns: {', '.join(names)})")
    if options.name_column:
        _check_unique_names(fs, paths, options.name_column)


def _check_unique_names(fs: pafs.FileSystem, paths: list[str], column: str) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    first: dict[str, str] = {}
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                given = pq.read_table(f, columns=[column]).column(column)
        except (OSError, pa.ArrowException, ValueError):
            continue
        values = [str(v) for v in pc.drop_null(given).to_pylist()]
        for name in values:
            if name in first:
                where = (f"two rows of {path}" if first[name] == path
                         else f"rows of {first[name]} and {path}")
                raise ConfigError(f"--name-column {column!r} gives the name "
                                  f"{safe_file_name(name)!r} to {where}: each image needs a name "
                                  "of its own (its file_name and image_id); make the names "
                                  "unique, or leave out --name-column (rows are then named "
                                  "<table>#<hash of the bytes>)")
            first[name] = path


def images_of(fs: pafs.FileSystem, path: str, table: str,
              options: ReadOptions) -> Iterator[tuple[Optional[str], Optional[bytes]]]:
    """``(name, bytes)`` of each row of one table (``render``)."""
    return ((name, data) for name, data, _ in table_images(fs, path, table, options.image_column,
                                                           options.name_column))

"""Find the input images and give each a stable id: image files, tar shards, Parquet tables.

For image files the driver lists every input itself, so that the run knows before any work
exactly which images must come out the other end; the listing becomes the Ray Dataset the
decode tasks read. Tar shards (WebDataset style) and Parquet tables with an image column are
read by Ray Data's own readers (``read_webdataset``, ``read_parquet``); their members are only
known as they are read.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe import storage
from segpipe.config import ConfigError
from segpipe.schema import IMAGE_ID_BITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LISTING_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
])


def image_id_for(file_name: str) -> int:
    """A stable id for ``file_name``: 53 bits of BLAKE2b of the relative path, so that it stays
    exact in every JSON tool (``schema.IMAGE_IDS``)."""
    digest = hashlib.blake2b(file_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << IMAGE_ID_BITS) - 1)


def is_image_name(name: str) -> bool:
    """True for names with an image extension, in any letter case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(input_uri: str) -> pa.Table:
    """List image files under ``input_uri`` (a folder or a single file), sorted by file_name.

    Returns a table with ``LISTING_SCHEMA``. ``file_name`` is the path relative to the input
    folder with ``/`` separators. Raises ``ConfigError`` when the input does not exist, holds no
    image, or two names would share an id.
    """
    fs, root = storage.resolve(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"INPUT {input_uri} does not exist")
    if info.type == pafs.FileType.File:
        files = [info]
        root = root.rsplit("/", 1)[0]
    else:
        files = storage.list_files(fs, root)
    rows = []
    prefix = root.rstrip("/") + "/"
    for f in files:
        file_name = f.path[len(prefix):] if f.path.startswith(prefix) else f.base_name
        if is_image_name(file_name):
            rows.append((image_id_for(file_name), file_name, f.path, f.size or 0))
    if not rows:
        raise ConfigError(f"INPUT {input_uri} holds no image file "
                          f"(extensions {', '.join(IMAGE_EXTENSIONS)}, any letter case)")
    _check_unique_ids(rows)
    columns = list(zip(*rows))
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, LISTING_SCHEMA)],
                    schema=LISTING_SCHEMA)


def _check_unique_ids(rows: list[tuple[int, str, str, int]]) -> None:
    seen: dict[int, str] = {}
    for image_id, file_name, _, _ in rows:
        other = seen.setdefault(image_id, file_name)
        if other != file_name:
            raise ConfigError(f"image id collision between {other!r} and {file_name!r}; "
                              "rename one of them")


def split_listing(listing: pa.Table, target_blocks: int = 64, max_rows: int = 1024) -> list[pa.Table]:
    """Cut the listing into blocks so that decode work spreads over many tasks."""
    rows = max(1, min(max_rows, math.ceil(listing.num_rows / target_blocks)))
    return [listing.slice(start, rows) for start in range(0, listing.num_rows, rows)]


# --- Inputs that cannot be listed image by image before reading: tar shards, Parquet tables ---

INPUT_FORMATS = ("auto", "files", "tar", "parquet")

#: Rows from every source into decode: ``path`` (read by decode) or ``data`` (bytes already read).
SOURCE_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("data", pa.large_binary()),
])


def detect_input_format(input_uri: str) -> str:
    """``files``, ``tar`` or ``parquet``, from the kinds of files under ``input_uri``."""
    fs, root = storage.resolve(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"INPUT {input_uri} does not exist")
    names = [info.path] if info.type == pafs.FileType.File else \
        [i.path for i in storage.list_files(fs, root)]
    kinds = {"files" if is_image_name(n) else "tar" if n.lower().endswith(".tar")
             else "parquet" if n.lower().endswith(".parquet") else None for n in names} - {None}
    if len(kinds) > 1:
        raise ConfigError(f"INPUT {input_uri} mixes {', '.join(sorted(kinds))} inputs; choose one "
                          "with --input-format")
    if not kinds:
        raise ConfigError(f"INPUT {input_uri} holds no image file, .tar shard or .parquet table")
    return kinds.pop()


def list_tables(input_uri: str, suffix: str) -> tuple[str, list[str]]:
    """The root folder and the sorted paths of the ``suffix`` files under ``input_uri``."""
    fs, root = storage.resolve(input_uri)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return root.rsplit("/", 1)[0], [root]
    paths = [i.path for i in storage.list_files(fs, root) if i.path.lower().endswith(suffix)]
    if not paths:
        raise ConfigError(f"INPUT {input_uri} holds no {suffix} file")
    return root, paths


def relative_name(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]


def _source_table(names: list[str], datas: list[bytes], done: frozenset[int]) -> pa.Table:
    rows = [(image_id_for(n), n, None, len(d), d) for n, d in zip(names, datas)]
    rows = [r for r in rows if r[0] not in done]
    columns = list(zip(*rows)) if rows else [[] for _ in SOURCE_SCHEMA]
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, SOURCE_SCHEMA)],
                    schema=SOURCE_SCHEMA)


def tar_members(batch: pa.Table, root: str, done: frozenset[int]) -> pa.Table:
    """Ray Data stage after ``read_webdataset``: one row per image member of each sample.

    WebDataset groups members by key (``001.jpg`` and ``001.json`` are one sample); every
    member with an image extension is one image, named ``<shard path>/<member name>``.
    """
    names, datas = [], []
    for sample in batch.to_pylist():
        shard = relative_name(sample["__url__"], root)
        for suffix, value in sample.items():
            member = f"{sample['__key__']}.{suffix}"
            if suffix.startswith("__") or value is None or not is_image_name(member):
                continue
            names.append(f"{shard}/{member}")
            datas.append(value)
    return _source_table(names, datas, done)


def parquet_images(batch: pa.Table, root: str, image_column: str, name_column: str | None,
                   done: frozenset[int]) -> pa.Table:
    """Ray Data stage after ``read_parquet``: rows of a table with an image-bytes column.

    The name is ``name_column``'s value, or ``<table path>#<BLAKE2b of the bytes>`` without one.
    A Hugging Face ``Image`` column (a struct with ``bytes``) is read as its bytes.
    """
    images = batch.column(image_column).to_pylist()
    datas = [(v or {}).get("bytes") or b"" if isinstance(v, dict) else (v or b"") for v in images]
    if name_column:
        names = [str(n) for n in batch.column(name_column).to_pylist()]
    else:
        paths = batch.column("path").to_pylist()
        names = [f"{relative_name(p, root)}#{hashlib.blake2b(d, digest_size=8).hexdigest()}"
                 for p, d in zip(paths, datas)]
    return _source_table(names, datas, done)


def list_inputs(input_uri: str, input_format: str, image_column: str = "image",
                name_column: Optional[str] = None) -> tuple[str, Optional[pa.Table]]:
    """The input format (``auto`` resolved) and, for image files, the listing of every image.

    Shards and tables are checked to exist (and tables to have the named columns); their
    images are only known as they are read, so they have no listing.
    """
    if input_format == "auto":
        input_format = detect_input_format(input_uri)
    if input_format == "files":
        return input_format, list_images(input_uri)
    suffix = ".tar" if input_format == "tar" else ".parquet"
    _, paths = list_tables(input_uri, suffix)
    if input_format == "parquet":
        check_parquet_columns(paths, input_uri, image_column, name_column)
    return input_format, None


def check_parquet_columns(paths: list[str], input_uri: str, image_column: str,
                          name_column: str | None) -> None:
    """Fail before any work when the tables lack the named columns."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(input_uri)
    with fs.open_input_file(paths[0]) as f:
        names = pq.read_schema(f).names
    for flag, column in (("--image-column", image_column), ("--name-column", name_column)):
        if column and column not in names:
            raise ConfigError(f"{flag} {column!r} is not a column of {paths[0]} "
                              f"(columns: {', '.join(names)})")

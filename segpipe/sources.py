"""Find the input images: list a folder or URI recursively and give each image a stable id.

The driver lists every input itself so that the run knows, before any work, exactly which
images must come out the other end; the listing becomes the Ray Dataset the decode tasks read.
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe import storage
from segpipe.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LISTING_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
])


def image_id_for(file_name: str) -> int:
    """A stable, positive 63-bit id for ``file_name`` (BLAKE2b of the relative path)."""
    digest = hashlib.blake2b(file_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


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

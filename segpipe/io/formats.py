"""The input formats segpipe reads, a registry: one entry of ``INPUT_FORMATS`` each.

* ``files``: image files under INPUT, listed by the driver (``sources.image_listing``) so the
  run knows every image before any work;
* ``tar``: WebDataset-style shards (``tar_shards``);
* ``parquet``: tables with an image column (``image_tables``).

A container format (shards, tables) is one module and one entry here: the file suffix that
marks its containers, the Ray Data stage that reads one container into ``sources.SOURCE_SCHEMA``
rows, the reader ``render`` draws from, what separates a container's name from its images'
names, and the check its containers need before any work.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import pyarrow as pa

from segpipe.config import ConfigError
from segpipe.io import image_tables, tar_shards
from segpipe.io.sources import InputFiles, ReadOptions, image_listing, input_files, is_image_name


@dataclass(frozen=True)
class InputFormat:
    """One input format. ``suffix`` None: image files themselves (no container)."""

    name: str
    suffix: Optional[str] = None
    #: what one container is called in messages ("shard", "table")
    container: str = ""
    #: Ray Data stage: ``(batch of container paths, options, done ids, monitor)`` → source rows
    read: Optional[Callable[..., pa.Table]] = None
    #: ``(fs, path, container name, options)`` → ``(name, bytes)`` of its images (``render``)
    images: Optional[Callable[..., Iterator[tuple[Optional[str], Optional[bytes]]]]] = None
    #: what follows the container's name in its images' ``file_name``
    separator: str = "/"
    #: before any work: ``(container paths, options)``, ``ConfigError`` for what cannot be read
    check: Optional[Callable[[list[str], ReadOptions], None]] = None


INPUT_FORMATS: dict[str, InputFormat] = {f.name: f for f in (
    InputFormat("files"),
    InputFormat("tar", ".tar", "shard", tar_shards.read_tar_shards, tar_shards.images_of, "/"),
    InputFormat("parquet", ".parquet", "table", image_tables.read_image_tables,
                image_tables.images_of, "#", image_tables.check_columns),
)}


def input_format(name: str) -> InputFormat:
    """The format named ``name``; ``ConfigError`` with the valid names for another."""
    if name not in INPUT_FORMATS:
        close = difflib.get_close_matches(name, INPUT_FORMATS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"input_format must be auto, {', '.join(INPUT_FORMATS)}, got {name!r}{hint}")
    return INPUT_FORMATS[name]


def detect_input_format(input_uri: str, found: Optional[InputFiles] = None) -> str:
    """The format of the files under ``input_uri`` (``ConfigError`` for none or a mix)."""
    found = found or input_files(input_uri)
    kinds = set()
    for path in (i.path for i in found.files):
        kinds |= {"files"} if is_image_name(path) else \
            {f.name for f in INPUT_FORMATS.values() if f.suffix and path.lower().endswith(f.suffix)}
    if len(kinds) > 1:
        raise ConfigError(f"INPUT {input_uri} mixes {', '.join(sorted(kinds))} inputs; choose one "
                          "with --input-format")
    if not kinds:
        containers = [f"{f.suffix} {f.container}" for f in INPUT_FORMATS.values() if f.suffix]
        raise ConfigError(f"INPUT {input_uri} holds no image file, {', '.join(containers[:-1])}"
                          f"{' or ' if len(containers) > 1 else ''}{containers[-1]}")
    return kinds.pop()


def list_containers(found: InputFiles, suffix: str, input_uri: str) -> list[str]:
    """The sorted paths of the ``suffix`` files among ``found`` (``input_uri``'s files)."""
    paths = [i.path for i in found.files if i.path.lower().endswith(suffix)]
    if not paths:
        raise ConfigError(f"INPUT {input_uri} holds no {suffix} file")
    return paths


@dataclass
class InputListing:
    """What ``list_inputs`` found: the format, the images (files inputs) and what was left out."""

    input_format: str
    listing: Optional[pa.Table]            # files inputs: every image
    skipped: dict[str, list[str]]
    root: str = ""                         # INPUT's folder
    tables: list[str] = field(default_factory=list)   # container inputs: their paths


def list_inputs(input_uri: str, format_name: str, image_column: str = "image",
                name_column: Optional[str] = None, exclude: Sequence[str] = ()) -> InputListing:
    """The input format (``auto`` resolved) and, for image files, the listing of every image.

    Containers are checked to exist (and with their format's ``check``); their images are only
    known as they are read, so they have no listing. ``exclude``: folders to leave out (the
    run's OUTPUT); see ``sources.input_files``.
    """
    if format_name != "auto":
        input_format(format_name)   # a wrong name before listing anything
    found = input_files(input_uri, exclude)
    chosen = input_format(detect_input_format(input_uri, found) if format_name == "auto" else format_name)
    if chosen.suffix is None:
        return InputListing(chosen.name, image_listing(found, input_uri), found.skipped, found.root)
    paths = list_containers(found, chosen.suffix, input_uri)
    if chosen.check is not None:
        chosen.check(paths, ReadOptions(input_uri, found.root, image_column, name_column))
    return InputListing(chosen.name, None, found.skipped, found.root, paths)

"""Split a run's ok images into COCO shards, name the shard files, and read and write their index.

A run's images are ordered by ``file_name``; shard ``k`` holds images ``k * shard_images`` up to
the next shard's first, every annotation of those images, and the run's whole category table:
each shard is a complete COCO dataset. Annotation ids count up from 1 across the shards in
that order, so the shards together are the unsharded files cut in pieces, and the same
predictions give the same bytes however they were made (resumed or not) and written (one
process or many Ray tasks). ``index.json``, written after every shard, lists them:

    {"format": "segpipe-coco-shards", "shard_images": 100000, "images": 250000,
     "annotations": 2400000, "shards": [{"instances": "instances-00000-of-00003.json",
     "results": "results-00000-of-00003.json", "images": 100000, "annotations": 961000,
     "first_annotation_id": 1, "first_file_name": "a/0.jpg", "last_file_name": "f/9.jpg"},
     ...]}

A run of at most ``shard_images`` images (or ``shard_images`` 0) keeps the single files
``instances.json`` and ``results.json``, listed in ``index.json`` as one shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from segpipe.config import ConfigError, one_line
from segpipe.io import storage
from segpipe.output.run_folder import COCO_NAME

INDEX_NAME = "index.json"
INDEX_FORMAT = "segpipe-coco-shards"


@dataclass(frozen=True)
class Shard:
    """One shard: its position, its file names, and its images in order (``read_image_table``
    rows: ``image_id``, ``file_name``, ``width``, ``height`` and where each row is)."""

    number: int
    instances: str
    results: str
    images: pa.Table


def shard_names(number: int, total: int) -> tuple[str, str]:
    """The instances and results file names of shard ``number`` of ``total``."""
    if total == 1:
        return "instances.json", "results.json"
    tag = f"-{number:05d}-of-{total:05d}"
    return f"instances{tag}.json", f"results{tag}.json"


def plan_shards(ok_images: pa.Table, shard_images: int) -> list[Shard]:
    """Cut ``ok_images`` (sorted by ``file_name``) into shards of ``shard_images`` images
    (0: one shard); a run without images has one empty shard."""
    size = shard_images if shard_images > 0 else max(1, ok_images.num_rows)
    total = max(1, -(-ok_images.num_rows // size))
    return [Shard(k, *shard_names(k, total), ok_images.slice(k * size, size))
            for k in range(total)]


def index_entry(shard: Shard, annotations: int, first_annotation_id: int) -> dict[str, Any]:
    names = shard.images.column("file_name")
    return {"instances": shard.instances, "results": shard.results,
            "images": shard.images.num_rows, "annotations": annotations,
            "first_annotation_id": first_annotation_id,
            "first_file_name": names[0].as_py() if len(names) else None,
            "last_file_name": names[-1].as_py() if len(names) else None}


def make_index(shard_images: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The index of a COCO folder (module docstring); nothing in it depends on time."""
    return {"format": INDEX_FORMAT, "shard_images": shard_images,
            "images": sum(e["images"] for e in entries),
            "annotations": sum(e["annotations"] for e in entries), "shards": entries}


def read_index(coco_dir: str) -> Optional[dict[str, Any]]:
    """The index of the COCO folder ``coco_dir``; None when it has none (written before
    shards existed, or a write that did not finish). ``ConfigError`` naming the file when it
    is not a segpipe index whose shards are files of that folder (``check_index``)."""
    fs, root = storage.resolve(coco_dir)
    path = storage.join(coco_dir, INDEX_NAME)
    try:
        data = json.loads(storage.read_bytes(fs, storage.join(root, INDEX_NAME)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {one_line(exc, 200)}") from None
    problem = check_index(data)
    if problem:
        raise ConfigError(f"{path} is not a segpipe COCO index: {problem}")
    return data


def check_index(data: Any) -> Optional[str]:
    """Why ``data`` is not a segpipe COCO index, or None: its format, at least one shard, and
    each shard's files plain names of the index's own folder (never ``../x.json`` or
    ``/etc/passwd``) in COCO's naming."""
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        return f"its format is not {INDEX_FORMAT!r}"
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        return "it lists no shard"
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard {k} is not an object"
        for key in ("instances", "results"):
            name = shard.get(key)
            if not isinstance(name, str) or not COCO_NAME.fullmatch(name) or name == INDEX_NAME:
                return (f"shard {k}'s {key} file {str(name)[:80]!r} is not a COCO file name of "
                        "the index's own folder")
    return None


def instances_files(coco_dir: str) -> list[str]:
    """The instances files of ``coco_dir`` in order: its index's shards, or ``instances.json``
    of a folder without an index."""
    index = read_index(coco_dir)
    names = [s["instances"] for s in index["shards"]] if index else ["instances.json"]
    return [storage.join(coco_dir.rstrip("/"), name) for name in names]


def load_instances(path: str) -> dict[str, Any]:
    """A COCO instances dataset from one file, or from every shard of an index (``path`` is
    an ``index.json`` or a folder holding one), joined in memory: for evaluation and small
    runs. Tools that load a dataset whole should take a sharded one shard by shard.
    ``ConfigError`` names a file that is not JSON or a shard that is no COCO dataset."""
    fs, resolved = storage.resolve(path)
    folder = None
    if storage.is_dir(fs, resolved):
        folder = path
    elif path.rstrip("/").endswith("/" + INDEX_NAME) or path == INDEX_NAME:
        folder = path.rstrip("/")[: -len(INDEX_NAME)].rstrip("/") or "."
    if folder is None:
        return _read_json(path)
    joined: Optional[dict[str, Any]] = None
    for shard_path in instances_files(folder):
        shard = _read_json(shard_path)
        if not isinstance(shard, dict) or not all(isinstance(shard.get(key), list)
                                                  for key in ("images", "annotations")):
            raise ConfigError(f"{shard_path} is not a COCO instances file (images, annotations, "
                              "categories)")
        if joined is None:
            joined = shard
        else:
            joined["images"].extend(shard["images"])
            joined["annotations"].extend(shard["annotations"])
    if joined is None:   # check_index lets no index of no shard through
        raise ConfigError(f"{path} lists no COCO file")
    return joined


def _read_json(path: str) -> Any:
    fs, resolved = storage.resolve(path)
    try:
        return json.loads(storage.read_bytes(fs, resolved))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {one_line(exc, 200)}") from None

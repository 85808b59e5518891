"""The export formats there are, and what ``--format`` asks beyond the detections.

A format is one module and one line of ``FORMATS``: the module defines

* ``WRITES``: the files it writes, in words (``--help``, messages);
* ``check_request(request)``: ``ConfigError`` for an ``ExportFormat`` it cannot write;
* ``check_target(to)``: ``ConfigError`` for a folder it cannot write into (its own files
  that are there and not proven segpipe's, links where it writes);
* ``write(predictions_dir, to, options, settings, request, parallel, show_progress)``: the
  files themselves; returns the ``ExportCounts`` and what ``export.json`` should say of them;
* ``notes(summary, to)``: what a person should know of an export (``export.json``'s
  ``summary``) into ``to`` beyond the counts, a sentence each (the command line shows them).

Modules are imported when their format is used: a format's libraries load only for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

from segpipe.config import DEFAULT_COCO_SHARD_IMAGES, ConfigError

#: Each format's name and the module that writes it.
FORMATS: dict[str, str] = {
    "coco": "segpipe.coco.writer",
    "label-studio": "segpipe.labels.label_studio",
    "yolo": "segpipe.labels.yolo",
}


@dataclass(frozen=True)
class ExportFormat:
    """What ``--format`` asks beyond the detections: the format, where the images are for tools
    that show them (Label Studio's URLs, YOLO's links), YOLO's train/val split and the images
    of a COCO shard."""

    name: str = "coco"
    image_root: Optional[str] = None
    val_fraction: float = 0.1
    split_seed: int = 0
    shard_images: int = DEFAULT_COCO_SHARD_IMAGES

    def check(self) -> None:
        """``ConfigError`` for a format request that cannot be written."""
        writer(self.name).check_request(self)


def writer(name: str) -> ModuleType:
    """The module that writes the format ``name`` (``ConfigError`` for one there is not)."""
    if name not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {name!r}")
    return importlib.import_module(FORMATS[name])

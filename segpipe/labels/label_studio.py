"""Label Studio tasks with segpipe's detections as pre-annotations, and the labelling config.

One task per ok image: ``data.image`` is the image's URL under a root the user gives (a Label
Studio local-files path such as ``/data/local-files/?d=photos/``, an ``s3://`` or ``gs://``
prefix its cloud storage resolves, or an ``http(s)`` URL), with ``file_name`` and
``segpipe_image_id`` beside it; ``predictions`` holds one prediction (``model_version``: the
architecture and the weights' sha256, ``score``: the mean of its regions') with one region per
detection:

- ``brushlabels`` (default): the mask in Label Studio's brush RLE (``labels.brush``), which its
  decoder turns back into exactly the mask's pixels, holes and separate parts included;
- ``polygonlabels`` (``polygons``): one region per 8-connected part of the mask, its pixel-edge
  ring with holes kept by keyhole cuts (``coco.polygons``), in percent of the image size;
  a mask of several parts becomes several regions, as Label Studio's polygons are one ring;
- ``rectanglelabels``: detections of a box-only detector.

Each region carries its class name as its label and its own ``score``. ``label_config`` is the
XML to paste into the project's Labeling Interface: the run's class names, in its order.
Tasks are written as JSON lists of at most ``TASKS_PER_FILE`` tasks (``tasks.json``, or
``tasks-00000-of-000NN.json``...), each importable on its own.
"""

from __future__ import annotations

import re
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from segpipe.annotations.formats import ExportFormat
from segpipe.annotations.jsonstream import JsonArrayWriter
from segpipe.annotations.polygons import mask_polygons
from segpipe.annotations.rows import add_counts, ok_image_table, selected_images
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.config import ConfigError
from segpipe.io import ownership, sources, storage
from segpipe.labels.brush import brush_rle
from segpipe.model.categories import CategoryTable
from segpipe.model.settings import RunSettings
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE

#: Tasks per file: Label Studio reads an uploaded file whole, in one request.
TASKS_PER_FILE = 10_000
FROM_NAME = "label"
TO_NAME = "image"
#: The region type of each kind of geometry, and the control tag that makes it.
REGION_TYPES = {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels"}
CONTROL_TAGS = {"brush": "BrushLabels", "polygon": "PolygonLabels", "rectangle": "RectangleLabels"}
#: URL schemes whose paths Label Studio's cloud storages resolve as object keys, unquoted.
STORAGE_SCHEMES = ("s3://", "gs://", "azure-blob://")
TASK_FILE_NAME = r"tasks(?:-\d{5,}-of-\d{5,})?\.json"


def region_kind(settings: RunSettings, options: ExportOptions) -> str:
    """``brush``, ``polygon`` or ``rectangle``: how this run's detections become regions."""
    if not settings.model.has_masks:
        return "rectangle"
    return "polygon" if options.polygons else "brush"


def label_config(categories: CategoryTable, kind: str, classes: Optional[frozenset[int]] = None,
                 note: Optional[str] = None) -> str:
    """The labelling config XML for tasks of ``kind`` regions with these categories (those in
    ``classes`` when given), in the run's order; ``note`` (random weights) stands above the
    image of every task as a ``Header``."""
    view = ET.Element("View")
    if note:
        ET.SubElement(view, "Header", value=note, style="color: #b00")
    ET.SubElement(view, "Image", name=TO_NAME, value="$" + TO_NAME, zoom="true", zoomControl="true")
    control = ET.SubElement(view, CONTROL_TAGS[kind], name=FROM_NAME, toName=TO_NAME)
    for category in categories.categories:
        if classes is None or category.id in classes:
            ET.SubElement(control, "Label", value=category.name)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def image_url(image_root: str, file_name: str) -> str:
    """The URL of the image file ``file_name`` names under ``image_root`` (its own name where
    ``file_name`` encodes one, ``sources.original_file_name``): object keys are left as they
    are for cloud storage schemes; elsewhere the name is percent-quoted (``/`` kept)."""
    original = sources.original_file_name(file_name) or file_name
    if image_root.startswith(STORAGE_SCHEMES):
        name = original
    else:
        name = urllib.parse.quote(original, safe="/")
    if image_root.endswith(("/", "=")):
        return image_root + name
    return image_root + "/" + name


def regions(detections: list[dict], width: int, height: int, kind: str) -> list[dict]:
    """The prediction regions of one image's detections (masks as COCO RLE)."""
    from pycocotools import mask as mask_utils

    out = []
    for k, det in enumerate(detections):
        common = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": REGION_TYPES[kind],
                  "original_width": width, "original_height": height, "image_rotation": 0,
                  "score": float(det["score"])}
        label = {REGION_TYPES[kind]: [det["category_name"]]}
        if kind == "brush":
            mask = mask_utils.decode(det["segmentation"])
            out.append({"id": f"d{k}", **common,
                        "value": {"format": "rle", "rle": brush_rle(mask), **label}})
        elif kind == "polygon":
            parts, _ = mask_polygons(det["segmentation"])
            for p, ring in enumerate(parts):
                points = np.asarray(ring, np.float64).reshape(-1, 2) / [width, height] * 100.0
                out.append({"id": f"d{k}" if len(parts) == 1 else f"d{k}p{p}", **common,
                            "value": {"points": points.tolist(), "closed": True, **label}})
        else:
            x, y, w, h = (float(v) for v in det["bbox"])
            out.append({"id": f"d{k}", **common,
                        "value": {"x": x / width * 100.0, "y": y / height * 100.0,
                                  "width": w / width * 100.0, "height": h / height * 100.0,
                                  "rotation": 0, **label}})
    return out


def model_version(settings: RunSettings) -> str:
    """What made the predictions, as Label Studio groups them: architecture and weights
    (``RANDOM WEIGHTS`` said where they were)."""
    random = " RANDOM WEIGHTS" if settings.random_weights else ""
    return f"segpipe {settings.model.arch} {settings.weights_sha256[:12]}{random}"


def make_task(row: dict, detections: list[dict], image_root: str, kind: str, version: str,
              extra: Optional[dict] = None) -> dict:
    """The Label Studio task of one ok image (``extra``: more ``data`` fields)."""
    found = regions(detections, row["width"], row["height"], kind)
    prediction: dict[str, Any] = {"model_version": version, "result": found}
    if found:
        prediction["score"] = float(np.mean([r["score"] for r in found]))
    data = {TO_NAME: image_url(image_root, row["file_name"]), "file_name": row["file_name"],
            "segpipe_image_id": row["image_id"], **(extra or {})}
    return {"data": data, "predictions": [prediction]}


def task_file_names(images: int) -> list[str]:
    """The task files of an export of ``images`` tasks."""
    total = max(1, -(-images // TASKS_PER_FILE))
    if total == 1:
        return ["tasks.json"]
    return [f"tasks-{k:05d}-of-{total:05d}.json" for k in range(total)]


def write_task_file(predictions_dir: str, files: list[str], images: pa.Table, path: str,
                    options: ExportOptions, settings: RunSettings, image_root: str,
                    extra: Optional[Callable[[dict], dict]] = None) -> ExportCounts:
    """Write the tasks of ``images`` (``ok_image_table`` rows, in their order) to the task
    file ``path``, atomically; returns its detection counts."""
    kind = region_kind(settings, options)
    version = model_version(settings)
    counts = ExportCounts()
    fs, root = storage.resolve(path)
    with storage.atomic_output(fs, root) as stream:
        stream.write(b"[")
        writer = JsonArrayWriter(stream)
        for row, kept in selected_images(predictions_dir, files, images, options, settings, counts):
            writer.write(make_task(row, kept, image_root, kind, version, extra(row) if extra else None))
        writer.flush()
        stream.write(b"\n]\n")
    return counts


def export_label_studio(predictions_dir: str, to: str, options: ExportOptions,
                        settings: RunSettings, image_root: str,
                        images: Optional[pa.Table] = None,
                        extra: Optional[Callable[[dict], dict]] = None,
                        parallel: bool = False) -> tuple[ExportCounts, list[str]]:
    """Write the tasks of the run's ok images (of ``images``, a ``read_image_table`` of the
    run or part of it, in its order; default all, by name) and ``label_config.xml`` into
    ``to``; ``extra(row)`` adds task data. With ``parallel`` (Ray initialised, no ``extra``)
    each task file is written by a Ray task. Returns the counts and the task files."""
    from segpipe.annotations.fanout import run_calls

    files, ok, counts = ok_image_table(predictions_dir, images)
    names = task_file_names(ok.num_rows)
    # an earlier export's task files and config go first: a killed export never leaves a
    # project of old and new tasks together
    earlier = ownership.recorded(to) or {}
    ownership.remove_recorded(to, [name for name in earlier if name == "label_config.xml" or
                                   re.fullmatch(TASK_FILE_NAME, name)])
    fs, root = storage.resolve(to)
    calls = [(predictions_dir, files, ok.slice(k * TASKS_PER_FILE, TASKS_PER_FILE),
              storage.join(to, name), options, settings, image_root, extra)
             for k, name in enumerate(names)]
    for part in run_calls(write_task_file, calls, parallel and extra is None):
        add_counts(counts, part)
    kind = region_kind(settings, options)
    storage.write_bytes_atomic(fs, storage.join(root, "label_config.xml"),
                               label_config(settings.categories, kind, options.classes,
                                            RANDOM_WEIGHTS_NOTE if settings.random_weights else None).encode())
    ownership.record_written(to, [*names, "label_config.xml"])
    return counts, names


# The Label Studio export format (``annotations.formats``).

WRITES = "tasks.json (or its parts) and label_config.xml"


def check_request(request: ExportFormat) -> None:
    """Label Studio needs the images' URL prefix."""
    if not request.image_root:
        raise ConfigError("--format label-studio needs --image-root: where Label Studio finds "
                          "the images, e.g. /data/local-files/?d=photos/ or s3://bucket/photos/")


def check_target(to: str) -> None:
    """Refuse to replace task files or a labelling config in ``to`` that segpipe did not write."""
    ownership.check_replaceable(to, ("label_config.xml",), matching=re.compile(TASK_FILE_NAME))


def write(predictions_dir: str, to: str, options: ExportOptions, settings: RunSettings,
          request: ExportFormat, parallel: bool, show_progress: bool) -> tuple[ExportCounts, dict]:
    """The tasks and labelling config in ``to``; what export.json says of them: the files."""
    counts, names = export_label_studio(predictions_dir, to, options, settings,
                                        request.image_root or "", parallel=parallel)
    return counts, {"task_files": names, "label_config": "label_config.xml"}


def notes(summary: dict, to: str) -> list[str]:
    """The task files, and where the labelling config goes."""
    return [f"tasks: {', '.join(summary['task_files'])}; paste {to.rstrip('/')}/label_config.xml "
            "into the project's Labeling Interface"]

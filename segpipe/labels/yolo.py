"""Ultralytics YOLO segmentation datasets: label files of normalised polygons, image lists
split by a seeded hash of the file name, and ``data.yaml``.

Layout (what Ultralytics' ``YOLODataset`` reads; it finds an image's label by replacing the
last ``/images/`` of its path with ``/labels/`` and its extension with ``.txt``)::

    DIR/data.yaml          path: DIR, train: train.txt, val: val.txt, names: {0: ..., ...}
    DIR/train.txt          ./images/<name> per line (val.txt likewise)
    DIR/images/<name>      a link to the image under --image-root (local roots only)
    DIR/labels/<stem>.txt  one line per detection: class x1 y1 x2 y2 ... (0..1)

``<name>`` is the image's ``file_name`` with any folder called ``images`` renamed
``images_`` (it would break that lookup); two names with one stem (``a.jpg``, ``a.png``) keep
their extension in the label's stem (``a.png.png`` → ``a.png.txt``). Every ok image gets a
label file, empty when nothing was kept (Ultralytics counts it as a background image).

Class indices are 0.. in the run's category order (those kept by ``--classes``).

A mask becomes one polygon whose vertices are the centres of its boundary pixels (OpenCV's
contour tracing, the tool Ultralytics rasterises with): ``cv2.fillPoly``, which Ultralytics'
``polygon2mask`` calls and which fills a polygon's edge pixels too, gives back exactly the
mask's pixels. Coordinates are written as pixel centres, ``(x + 0.5) / width``, so the
integer cast in ``polygon2mask`` lands on the pixel. Ultralytics wants one polygon per
object: holes and separate parts are joined into one ring by zero-width cuts between their
nearest vertices (as its ``merge_multi_segment`` does). A cut to a hole runs inside the mask
and costs nothing; a cut between two separate parts is drawn by ``fillPoly`` as a 1-pixel
line across the gap, the one loss (docs/labelling.md gives the figures).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segpipe import schema
from segpipe.coco.selection import ExportCounts, ExportOptions
from segpipe.io import ownership, storage
from segpipe.labels.rows import ok_image_table, selected_images

YOLO_FILES = ("data.yaml", "train.txt", "val.txt")
YOLO_DIRS = ("images", "labels")
#: Extensions Ultralytics takes as images (``ultralytics.data.utils.IMG_FORMATS``).
IMAGE_SUFFIXES = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp",
                            "pfm", "heic"})
DIGITS = 6


@dataclass(frozen=True)
class YoloSplit:
    """Which images are for validation: a seeded hash of each ``file_name`` below
    ``val_fraction`` (the same split on every machine and rerun, whatever the order)."""

    val_fraction: float = 0.1
    seed: int = 0

    def is_val(self, file_name: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}\0{file_name}".encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < self.val_fraction


def mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """The boundary rings of ``mask`` (outlines and holes) as ``(N, 2)`` integer pixel
    coordinates ``x, y``, from OpenCV's contour tracing; straight runs are kept as their ends
    (``fillPoly`` draws the same pixels)."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_CCOMP,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.int64) for c in contours]


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Indices of the nearest pair of vertices of ``a`` and ``b``, and their squared distance."""
    best = (0, 0, np.inf)
    for start in range(0, len(a), 256):
        d = ((a[start:start + 256, None, :] - b[None, :, :]) ** 2).sum(-1)
        i, j = divmod(int(d.argmin()), d.shape[1])
        if d[i, j] < best[2]:
            best = (start + i, j, float(d[i, j]))
    return best


def join_rings(rings: list[np.ndarray]) -> np.ndarray:
    """One ring through all ``rings``: starting from the longest, the ring nearest to what is
    joined so far is spliced in at its nearest vertices, walked round, and left along the
    same zero-width cut (the shortest cuts, as a minimum spanning tree of the rings)."""
    rings = sorted(rings, key=len, reverse=True)
    joined, rest = rings[0], rings[1:]
    while rest:
        found = [_nearest(joined, other) for other in rest]
        k = min(range(len(rest)), key=lambda n: found[n][2])
        i, j, _ = found[k]
        other = rest.pop(k)
        joined = np.concatenate([joined[:i + 1], other[j:], other[:j + 1], joined[i:]])
    return joined


def mask_line(class_index: int, mask: np.ndarray) -> Optional[str]:
    """The label line of one mask: its class and its joined ring, normalised; None for an
    empty mask."""
    rings = mask_rings(mask)
    if not rings:
        return None
    ring = join_rings(rings)
    height, width = mask.shape
    points = (ring + 0.5) / np.array([width, height], np.float64)
    return f"{class_index} " + " ".join(f"{v:.{DIGITS}f}" for v in points.ravel())


def box_line(class_index: int, bbox: list[float], width: int, height: int) -> str:
    """The label line of a box-only detection: its box as a 4-corner polygon."""
    x, y, w, h = (float(v) for v in bbox)
    corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]]) / [width, height]
    return f"{class_index} " + " ".join(f"{v:.{DIGITS}f}" for v in np.clip(corners, 0, 1).ravel())


def dataset_names(file_names: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The name of each image in the dataset (``images/<name>``; its label is
    ``labels/<stem>.txt``): ``file_name`` with folders called ``images`` renamed, an
    extension Ultralytics reads, and the extension kept in the stem where two names share a
    stem. Arrow columns: no Python object per image."""
    if isinstance(file_names, pa.ChunkedArray):
        file_names = file_names.combine_chunks()
    names = pc.replace_substring_regex(file_names, r"(^|/)images(/)", r"\1images_\2")
    suffix = pc.utf8_lower(pc.extract_regex(names, r"\.(?P<s>[^./]+)$").field("s"))
    known = pc.fill_null(pc.is_in(suffix, pa.array(sorted(IMAGE_SUFFIXES))), False)
    names = pc.if_else(known, names, pc.binary_join_element_wise(names, ".jpg", ""))
    stems = pc.replace_substring_regex(names, r"\.[^./]+$", "")
    counts = pc.value_counts(stems)
    shared = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    twice = pc.is_in(stems, shared)
    suffixes = pc.extract_regex(names, r"(?P<s>\.[^./]+)$").field("s")
    return pc.if_else(twice, pc.binary_join_element_wise(names, suffixes, ""), names)


def label_name(name: str) -> str:
    """``labels/<stem>.txt`` of the dataset image ``images/<name>``."""
    return "labels/" + name.rsplit(".", 1)[0] + ".txt"


def data_yaml(root: str, names: list[str]) -> str:
    """``data.yaml``: the dataset's folder, its lists and class names in index order."""
    import json

    lines = ["# Ultralytics YOLO segmentation dataset written by segpipe",
             f"path: {json.dumps(root)}", "train: train.txt", "val: val.txt", "names:"]
    lines += [f"  {k}: {json.dumps(name, ensure_ascii=False)}" for k, name in enumerate(names)]
    return "\n".join(lines) + "\n"


@dataclass
class YoloCounts:
    """What a YOLO export wrote beyond ``ExportCounts``."""

    train: int = 0
    val: int = 0
    linked: int = 0
    renamed: int = 0
    duplicate_names: int = 0   # images left out: their label name is another image's
    same_box_lines: int = 0    # lines with another line's class and box: Ultralytics drops them
    classes: list[str] = field(default_factory=list)


def export_yolo(predictions_dir: str, to: str, options: ExportOptions, settings: schema.RunSettings,
                split: YoloSplit, image_root: Optional[str] = None,
                images: Optional[pa.Table] = None) -> tuple[ExportCounts, YoloCounts]:
    """Write the YOLO dataset of the run's ok images into the local folder ``to``; with a
    local ``image_root`` (the folder the run read), ``images/`` holds links to the images."""
    image_root = os.path.abspath(image_root) if image_root is not None else None   # links' targets
    categories = [c for c in settings.categories.categories
                  if options.classes is None or c.id in options.classes]
    index_of = {c.id: k for k, c in enumerate(categories)}
    yolo = YoloCounts(classes=[c.name for c in categories])
    _, ok, _ = ok_image_table(predictions_dir, images)
    names = dataset_names(ok.column("file_name"))
    yolo.renamed = int(pc.sum(pc.not_equal(names, ok.column("file_name"))).as_py() or 0)
    labels = pc.replace_substring_regex(names, r"\.[^./]+$", "")
    repeated = pc.value_counts(labels)
    repeated = repeated.field("values").filter(pc.greater(repeated.field("counts"), 1))
    clashing = set(repeated.to_pylist())   # rare: names that still share a label
    counts = ExportCounts()
    fs, root = storage.resolve(os.path.abspath(to))
    with contextlib.ExitStack() as stack:
        lists = {part: stack.enter_context(storage.atomic_output(fs, storage.join(root, f"{part}.txt")))
                 for part in ("train", "val")}
        _write_dataset(predictions_dir, to, options, settings, split, image_root, images, names,
                       clashing, index_of, counts, yolo, lists)
    _write_text(os.path.join(to, "data.yaml"), data_yaml(os.path.abspath(to), yolo.classes))
    ownership.record_written(to, YOLO_FILES)
    return counts, yolo


def _write_dataset(predictions_dir, to, options, settings, split, image_root, images, names,
                   clashing, index_of, counts, yolo, lists) -> None:
    """The label files and links of every ok image, and its line in its list."""
    from pycocotools import mask as mask_utils

    seen: set[str] = set()
    rows = selected_images(predictions_dir, options, settings, counts, images)
    for (row, kept), name in zip(rows, _strings(names)):
        label = label_name(name)
        if label[len("labels/"):-len(".txt")] in clashing:
            if label in seen:
                yolo.duplicate_names += 1
                continue
            seen.add(label)
        lines = []
        for det in kept:
            if det["segmentation"] is None:
                lines.append(box_line(index_of[det["category_id"]], det["bbox"], row["width"], row["height"]))
                continue
            line = mask_line(index_of[det["category_id"]], mask_utils.decode(det["segmentation"]))
            if line is not None:
                lines.append(line)
        yolo.same_box_lines += len(lines) - len({_class_and_box(line) for line in lines})
        _write_text(os.path.join(to, label), "".join(line + "\n" for line in lines))
        if image_root is not None:
            yolo.linked += _link(os.path.join(to, "images", name), os.path.join(image_root, row["file_name"]))
        part = "val" if split.is_val(row["file_name"]) else "train"
        lists[part].write(f"./images/{name}\n".encode("utf-8", "surrogateescape"))
        setattr(yolo, part, getattr(yolo, part) + 1)


def _class_and_box(line: str) -> tuple:
    """A label line's class and the box of its points (what Ultralytics de-duplicates on)."""
    values = line.split()
    points = np.asarray(values[1:], np.float64).reshape(-1, 2)
    return (values[0], *points.min(0).tolist(), *points.max(0).tolist())


def _strings(column: pa.ChunkedArray, chunk: int = 4096):
    """The strings of ``column``, converted a chunk at a time."""
    for start in range(0, len(column), chunk):
        yield from column.slice(start, chunk).to_pylist()


def _write_text(path: str, text: str) -> None:
    fs, root = storage.resolve(path)
    storage.write_bytes_atomic(fs, root, text.encode("utf-8", "surrogateescape"))


def _link(path: str, target: str) -> int:
    """Make ``path`` a link to ``target`` (replacing segpipe's earlier link); 1 if made."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    if os.path.islink(path):
        if os.readlink(path) == target:
            return 1
        os.unlink(path)
    elif os.path.exists(path):
        return 0
    os.symlink(target, path)
    return 1

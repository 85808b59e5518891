"""Ultralytics YOLO segmentation datasets: label files of normalised polygons, image lists
split by a seeded hash of the file name, and ``data.yaml``.

Layout (what Ultralytics' ``YOLODataset`` reads; it finds an image's label by replacing the
last ``/images/`` of its path with ``/labels/`` and its extension with ``.txt``)::

    DIR/data.yaml          path: DIR, train: train.txt, val: val.txt, names: {0: ..., ...}
    DIR/train.txt          ./images/<name> per line (val.txt likewise)
    DIR/images/<name>      a link to the image under --image-root (local roots only)
    DIR/labels/<stem>.txt  one line per detection: class x1 y1 x2 y2 ... (0..1)

``<name>`` is the image's ``file_name`` with any folder called ``images`` renamed
``images_`` (it would break that lookup), ``.jpg`` added where its extension is none that
Ultralytics reads as an image; two names with one stem (``a.jpg``, ``a.png``) keep their
extension in the label's stem (``a.png.png`` → ``a.png.txt``). Every ok image gets a
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
line across the gap, the one loss (docs/labelling.md gives the figures). A polygon has at
least 3 points: Ultralytics reads a line of 2 as a box row, and drops the image's labels.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from segpipe.annotations.fanout import run_calls
from segpipe.annotations.formats import ExportFormat
from segpipe.annotations.rows import add_counts, ok_image_table, selected_images
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.config import ConfigError
from segpipe.io import ownership, sources, storage
from segpipe.model.settings import RunSettings
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE

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
    same zero-width cut (the shortest cuts: Prim's minimum spanning tree of the rings, each
    vertex keeping its nearest joined vertex, so a mask of thousands of fragments stays quick)."""
    rings = sorted(rings, key=len, reverse=True)
    vertices = np.concatenate(rings)
    xs, ys = vertices[:, 0], vertices[:, 1]   # int64: squares of any image side
    offsets = np.cumsum([0] + [len(r) for r in rings])
    ring_of = np.repeat(np.arange(len(rings)), np.diff(offsets))
    nearest = np.full(len(vertices), np.iinfo(np.int64).max, np.int64)   # squared distance
    source = np.zeros(len(vertices), np.int64)    # the joined vertex it is measured from
    waiting = np.ones(len(rings), bool)
    joined, origin = rings[0], np.arange(len(rings[0]), dtype=np.int64)
    added = 0
    while True:
        waiting[added] = False
        others = np.flatnonzero(waiting[ring_of])
        for start in range(offsets[added], offsets[added + 1], 256):
            stop = min(start + 256, offsets[added + 1])
            d = (xs[start:stop, None] - xs[None, others]) ** 2 + (ys[start:stop, None] - ys[None, others]) ** 2
            closest, at = d.min(0), d.argmin(0)
            better = closest < nearest[others]
            nearest[others[better]], source[others[better]] = closest[better], start + at[better]
        if not waiting.any():
            return joined
        per_ring = np.where(waiting, np.minimum.reduceat(nearest, offsets[:-1]), np.iinfo(np.int64).max)
        k = int(per_ring.argmin())
        j = int(nearest[offsets[k]:offsets[k + 1]].argmin())
        i = int(np.flatnonzero(origin == source[offsets[k] + j])[0])
        other, ids = rings[k], np.arange(offsets[k], offsets[k + 1], dtype=np.int64)
        joined = np.concatenate([joined[:i + 1], other[j:], other[:j + 1], joined[i:]])
        origin = np.concatenate([origin[:i + 1], ids[j:], ids[:j + 1], origin[i:]])
        added = k


def mask_points(mask: np.ndarray) -> Optional[np.ndarray]:
    """The normalised ``(N, 2)`` polygon of one mask: its rings joined, at pixel centres, at
    least 3 points (a line of 2 would be read as a box: Ultralytics then drops the whole
    image's labels); None for an empty mask."""
    rings = mask_rings(mask)
    if not rings:
        return None
    height, width = mask.shape
    ring = join_rings(rings)
    if len(ring) < 3:   # a pixel or a straight line: Ultralytics reads 1 or 2 points as a box row
        ring = np.concatenate([ring, ring[-1:].repeat(3 - len(ring), axis=0)])
    return (ring + 0.5) / np.array([width, height], np.float64)


def label_line(class_index: int, points: np.ndarray) -> str:
    """One label line: the class and the polygon's normalised coordinates."""
    return f"{class_index} " + " ".join(f"{v:.{DIGITS}f}" for v in points.ravel())


def box_points(bbox: list[float], width: int, height: int) -> np.ndarray:
    """The normalised polygon of a box-only detection: its 4 corners."""
    x, y, w, h = (float(v) for v in bbox)
    corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]]) / [width, height]
    return np.clip(corners, 0, 1)


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


def label_names(names: pa.Array) -> pa.Array:
    """``labels/<stem>.txt`` of each dataset image ``images/<name>`` (Arrow: no Python
    object per image)."""
    stems = pc.replace_substring_regex(names, r"\.[^.]*$", "")
    return pc.binary_join_element_wise("labels/", stems, ".txt", "")


def data_yaml(root: str, names: list[str], note: Optional[str] = None) -> str:
    """``data.yaml``: the dataset's folder, its lists and class names in index order
    (``note``, random weights: a comment at its top)."""
    import json

    lines = ([f"# {note}"] if note else []) + [
             "# Ultralytics YOLO segmentation dataset written by segpipe",
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
    missing_images: int = 0    # --image-root has no file of that name: no link made
    left_alone: int = 0        # a label or link not written: something else is there, or a
                               # folder on the way links out of the dataset
    classes: list[str] = field(default_factory=list)


#: Images whose labels one call of ``write_label_part`` writes (one Ray task with ``parallel``).
PART_IMAGES = 10_000


@dataclass(frozen=True)
class YoloTarget:
    """Where and how a part's labels are written: the dataset folder, the local image folder
    to link from (None: no links), the split, and each category id's class index."""

    to: str
    image_root: Optional[str]
    split: YoloSplit
    index_of: dict[int, int]


@dataclass
class YoloPart:
    """What ``write_label_part`` wrote: counts, its images' lines of train.txt and val.txt,
    and the stamp (``ownership.STAMPS_SCHEMA`` columns) of each label file it wrote."""

    counts: ExportCounts = field(default_factory=ExportCounts)
    yolo: YoloCounts = field(default_factory=YoloCounts)
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    written: dict[str, list] = field(default_factory=lambda: {"name": [], "size": [], "mtime_ns": []})


def export_yolo(predictions_dir: str, to: str, options: ExportOptions, settings: RunSettings,
                split: YoloSplit, image_root: Optional[str] = None,
                images: Optional[pa.Table] = None, parallel: bool = False) -> tuple[ExportCounts, YoloCounts]:
    """Write the YOLO dataset of the run's ok images (of ``images``, default all) into the
    local folder ``to``; with a local ``image_root`` (the folder the run read), ``images/``
    holds links to the images. With ``parallel`` (Ray initialised) each part of
    ``PART_IMAGES`` images is written by a Ray task (on the machine that holds ``to``: a
    cluster's nodes must share it)."""
    categories = [c for c in settings.categories.categories
                  if options.classes is None or c.id in options.classes]
    target = YoloTarget(os.path.abspath(to), os.path.abspath(image_root) if image_root else None,
                        split, {c.id: k for k, c in enumerate(categories)})
    files, ok, counts = ok_image_table(predictions_dir, images)
    names = dataset_names(ok.column("file_name"))
    yolo = YoloCounts(classes=[c.name for c in categories])
    yolo.renamed = int(pc.sum(pc.not_equal(names, ok.column("file_name"))).as_py() or 0)
    keep = _first_of_each_label(names)
    yolo.duplicate_names = int(len(keep) - pc.sum(keep).as_py()) if len(keep) else 0
    ownership.remove_recorded(to, ["data.yaml"])   # no training on a half-written dataset
    stamps = ownership.read_stamps(to)
    labels = label_names(names)
    known = stamps.take(pc.index_in(labels, value_set=stamps.column("name")))
    entries = pa.table({"name": names, "label": labels, "keep": keep,
                        "size": known.column("size"), "mtime_ns": known.column("mtime_ns")})
    calls = [(predictions_dir, files, ok.slice(start, PART_IMAGES), entries.slice(start, PART_IMAGES),
              options, settings, target)
             for start in range(0, ok.num_rows, PART_IMAGES)]
    fs, root = storage.resolve(target.to)
    written = []
    with storage.atomic_output(fs, storage.join(root, "train.txt")) as train, \
            storage.atomic_output(fs, storage.join(root, "val.txt")) as val:
        for part in run_calls(write_label_part, calls, parallel):
            add_counts(counts, part.counts)
            for name in ("train", "val", "linked", "same_box_lines", "missing_images", "left_alone"):
                setattr(yolo, name, getattr(yolo, name) + getattr(part.yolo, name))
            train.write("".join(part.train).encode("utf-8", "surrogateescape"))
            val.write("".join(part.val).encode("utf-8", "surrogateescape"))
            written.append(pa.table(part.written, schema=ownership.STAMPS_SCHEMA))
    # the label files written now, and those of earlier exports not written again
    fresh = pa.concat_tables(written) if written else ownership.STAMPS_SCHEMA.empty_table()
    ownership.write_stamps(to, pa.concat_tables([stamps.filter(pc.invert(pc.is_in(
        stamps.column("name"), value_set=fresh.column("name")))), fresh]))
    _write_text(os.path.join(target.to, "data.yaml"),
                data_yaml(target.to, yolo.classes, RANDOM_WEIGHTS_NOTE if settings.random_weights else None))
    ownership.record_written(to, YOLO_FILES)
    return counts, yolo


def _first_of_each_label(names: pa.Array) -> pa.Array:
    """Per image, whether it is the first with its label file (names that still share one
    after ``dataset_names`` are rare: only those are looked at one by one)."""
    labels = pc.replace_substring_regex(names, r"\.[^./]+$", "")
    repeated = pc.value_counts(labels)
    repeated = repeated.field("values").filter(pc.greater(repeated.field("counts"), 1))
    keep = np.ones(len(names), bool)
    seen: set[str] = set()
    for k in np.flatnonzero(pc.is_in(labels, repeated).to_numpy(zero_copy_only=False)):
        label = labels[int(k)].as_py()
        keep[k] = label not in seen
        seen.add(label)
    return pa.array(keep)


def write_label_part(predictions_dir: str, files: list[str], images: pa.Table, entries: pa.Table,
                     options: ExportOptions, settings: RunSettings,
                     target: YoloTarget) -> YoloPart:
    """The label files and image links of ``images`` (``ok_image_table`` rows), and their
    list lines. ``entries`` holds per image its dataset ``name``, its ``label`` file, whether
    to ``keep`` it (false: its label name is another's) and the ``size`` and ``mtime_ns``
    segpipe recorded when it last wrote that label file (null: never): a label file already
    there is replaced only if it still has them."""
    from pycocotools import mask as mask_utils

    part = YoloPart()
    keep = entries.column("keep")
    chosen, entries = images.filter(keep), entries.filter(keep)
    for (row, kept), name, relative, size, mtime_ns in zip(
            selected_images(predictions_dir, files, chosen, options, settings, part.counts),
            *(_strings(entries.column(c)) for c in ("name", "label", "size", "mtime_ns"))):
        lines, boxes = [], set()
        for det in kept:
            points = (box_points(det["bbox"], row["width"], row["height"])
                      if det["segmentation"] is None else mask_points(mask_utils.decode(det["segmentation"])))
            if points is None:
                continue
            index = target.index_of[det["category_id"]]
            lines.append(label_line(index, points))
            boxes.add((index, *np.round(points.min(0), DIGITS).tolist(), *np.round(points.max(0), DIGITS).tolist()))
        part.yolo.same_box_lines += len(lines) - len(boxes)   # Ultralytics reads one line of each
        label = os.path.join(target.to, relative)
        there = ownership.local_stamp(label)
        if (there is not None and there != (size, mtime_ns)) or \
                not _inside(target.to, posixpath.dirname(label)):
            part.yolo.left_alone += 1   # not segpipe's as written, or a link: never written over
        else:
            _write_text(label, "".join(line + "\n" for line in lines))
            size, mtime_ns = ownership.local_stamp(label) or (-1, -1)
            for key, value in (("name", relative), ("size", size), ("mtime_ns", mtime_ns)):
                part.written[key].append(value)
        if target.image_root is not None:
            # a\b.jpg is stored as a%5Cb.jpg (sources.original_file_name)
            source = os.path.join(target.image_root, sources.original_file_name(row["file_name"])
                                  or row["file_name"])
            if os.path.isfile(source):
                made = _link(target.to, os.path.join(target.to, "images", name), source)
                part.yolo.linked += made
                part.yolo.left_alone += 1 - made
            else:
                part.yolo.missing_images += 1
        listed = part.val if target.split.is_val(row["file_name"]) else part.train
        listed.append(f"./images/{name}\n")
    part.yolo.train, part.yolo.val = len(part.train), len(part.val)
    return part


def _strings(column: pa.Array, chunk: int = 4096):
    """The strings of ``column``, converted a chunk at a time."""
    for start in range(0, len(column), chunk):
        yield from column.slice(start, chunk).to_pylist()


def _write_text(path: str, text: str) -> None:
    fs, root = storage.resolve(path)
    storage.write_bytes_atomic(fs, root, text.encode("utf-8", "surrogateescape"))


def _inside(folder: str, directory: str) -> bool:
    """Whether ``directory`` (made or not) resolves inside ``folder``: no link on the way
    leads out of it."""
    real = os.path.realpath(folder)
    return os.path.realpath(directory).startswith(real + os.sep)


def _link(folder: str, path: str, target: str) -> int:
    """Make ``path`` (under ``folder``) a link to ``target``; 1 if it is one now. Whatever is
    at ``path`` already is left alone (segpipe removes nothing it cannot prove its own), as
    is a path whose folders lead out of ``folder``: 0."""
    directory = posixpath.dirname(path)
    if not _inside(folder, directory):
        return 0
    os.makedirs(directory, exist_ok=True)
    if os.path.lexists(path):
        return int(os.path.islink(path) and os.readlink(path) == target)
    os.symlink(target, path)
    return 1


# The Ultralytics YOLO export format (``annotations.formats``).

WRITES = "data.yaml, train.txt, val.txt, labels/ and images/"


def check_request(request: ExportFormat) -> None:
    """A share of validation images, and a local folder of images to link from (if any)."""
    if not 0.0 <= request.val_fraction <= 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1], got {request.val_fraction}")
    if request.image_root and not os.path.isdir(request.image_root):
        raise ConfigError(f"--image-root {request.image_root} is not a local folder: a YOLO "
                          "dataset links its images from the folder the run read")


def check_target(to: str) -> None:
    """Refuse a folder Ultralytics cannot read (not local), links where the dataset's labels
    and images go, dataset files or a stamps table segpipe did not write, and ``labels/`` or
    ``images/`` of a folder that is no YOLO dataset of segpipe's."""
    fs, root = storage.resolve(to)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise ConfigError(f"--format yolo writes a local folder (Ultralytics reads one), not {to}")
    ownership.refuse_links(to, YOLO_DIRS, "export writes YOLO labels there")
    ownership.check_replaceable(to, YOLO_FILES)
    ownership.read_stamps(to)   # its record of the label files it wrote, if any, is its own
    ours = "data.yaml" in (ownership.recorded(to) or {})
    there = [storage.join(root, d) for d in YOLO_DIRS if storage.exists(fs, storage.join(root, d))]
    if there and not ours:
        raise ownership.refusal(there, to, "write into")


def write(predictions_dir: str, to: str, options: ExportOptions, settings: RunSettings,
          request: ExportFormat, parallel: bool, show_progress: bool) -> tuple[ExportCounts, dict]:
    """The dataset in ``to``; what export.json says of it: ``YoloCounts``."""
    counts, yolo = export_yolo(predictions_dir, to, options, settings,
                               YoloSplit(request.val_fraction, request.split_seed),
                               request.image_root, parallel=parallel)
    return counts, {"data_yaml": "data.yaml", **asdict(yolo)}


def notes(summary: dict, to: str) -> list[str]:
    """The split and how to train, where the images are, and what was not written."""
    image_root = summary["asked"].get("image_root")
    said = [f"{summary['train']} train and {summary['val']} val images, {len(summary['classes'])} "
            f"classes; train with data={to.rstrip('/')}/data.yaml"]
    if not image_root:
        said.append("no --image-root: put (or link) each image at DIR/images/<name> as train.txt "
                    "and val.txt list them")
    if summary["missing_images"]:
        said.append(f"{summary['missing_images']} image(s) not found under {image_root}: not "
                    "linked (is it the folder the run read?)")
    if summary["left_alone"]:
        said.append(f"{summary['left_alone']} label file(s) or image link(s) not written: another "
                    "file or link is there, or one segpipe wrote was edited since, or a folder on "
                    "the way links out of DIR (segpipe replaces only what it wrote, as it wrote it)")
    if summary["same_box_lines"]:
        said.append(f"{summary['same_box_lines']} label line(s) repeat another detection's class "
                    "and box (tiny masks): Ultralytics reads one of each")
    if summary["duplicate_names"]:
        said.append(f"{summary['duplicate_names']} image(s) left out: their label file name is "
                    "another image's")
    return said

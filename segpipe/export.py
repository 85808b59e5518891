"""Write COCO ``instances.json`` and ``results.json`` from ``predictions/``, streaming.

Reads the Parquet predictions only (never a model or an image). The image table (a few small
columns per image) is read whole and sorted by ``file_name``; detections are streamed batch by
batch straight into both JSON files, which are written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segpipe import __version__, ownership, schema, storage
from segpipe.config import ConfigError
from segpipe.layout import COCO_FILES, LOGS_DIR, check_folder_target, existing_predictions, \
    prediction_files, read_run_settings
from segpipe.progress import Progress

EXPORT_JSON = "export.json"
IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "status", "error"]


@dataclass
class ExportOptions:
    """Which detections go into the COCO files, and how their masks are made."""

    score_threshold: float
    mask_threshold: Optional[float] = None   # None: the run's own masks, as stored
    classes: Optional[frozenset[int]] = None  # category ids to keep; None: all
    max_per_image: Optional[int] = None      # highest-scoring N per image, after other filters
    min_area: int = 1                        # masks with fewer pixels are left out
    polygons: bool = False                   # polygon segmentations instead of RLE
    instances_bbox: str = "mask"             # instances.json bbox: "mask" (the tight box of the
                                             # written mask, as COCO ground truth has it) or
                                             # "model" (the predicted box)

    def repastes_masks(self, settings: schema.RunSettings) -> bool:
        """Whether masks are made anew from the stored soft masks (a new mask threshold)."""
        return self.mask_threshold is not None and self.mask_threshold != settings.mask_threshold


@dataclass
class ExportCounts:
    """What an export read, wrote and left out (each detection is counted once, first reason)."""

    images: int = 0
    ok: int = 0
    errors: int = 0
    detections: int = 0                 # stored detections (>= the run's score floor)
    annotations: int = 0                # written to both COCO files
    below_threshold: int = 0
    other_classes_left_out: int = 0     # not in --classes
    unknown_category_left_out: int = 0  # a label without a category (COCO's id gaps, "N/A")
    empty_masks_left_out: int = 0       # no pixel above the mask threshold
    small_masks_left_out: int = 0       # fewer pixels than min_area
    no_polygon_left_out: int = 0        # --polygons: no polygon (never for a non-empty mask)
    over_max_per_image: int = 0
    masks_with_holes: int = 0           # --polygons: masks with holes (kept by keyhole rings)
    per_category: dict[str, int] = field(default_factory=dict)

    def add(self, other: "ExportCounts") -> None:
        """Add ``other``'s detection counts (an export of more files) to these."""
        for name, value in asdict(other).items():
            if isinstance(value, int) and name not in ("images", "ok", "errors"):
                setattr(self, name, getattr(self, name) + value)

    def left_out(self) -> list[tuple[int, str]]:
        """``(count, reason)`` for every reason that left detections out, in selection order."""
        reasons = [
            (self.below_threshold, "below the score threshold"),
            (self.other_classes_left_out, "of classes not asked for (--classes)"),
            (self.unknown_category_left_out, "with labels that are no category ('N/A')"),
            (self.empty_masks_left_out, "with empty masks at the mask threshold"),
            (self.small_masks_left_out, "smaller than --min-area"),
            (self.over_max_per_image, "over --max-per-image"),
            (self.no_polygon_left_out, "without a polygon of 3+ points (--polygons)"),
        ]
        return [(n, reason) for n, reason in reasons if n]


def predictions_dataset(predictions_dir: str) -> pads.Dataset:
    """A pyarrow dataset over the complete prediction files of ``predictions_dir``."""
    fs, _ = storage.resolve(predictions_dir)
    return pads.dataset(prediction_files(predictions_dir), format="parquet", filesystem=fs,
                        schema=schema.PREDICTION_SCHEMA)


def read_image_table(predictions_dir: str) -> pa.Table:
    """One row per image (no detections), sorted by ``file_name``."""
    table = predictions_dataset(predictions_dir).to_table(columns=IMAGE_COLUMNS)
    return table.sort_by("file_name")


def iter_ok_rows(predictions_dir: str, batch_rows: int = 256,
                 soft_masks: bool = True) -> Iterator[dict]:
    """Yield every ok row (``image_id``, ``file_name``, size, ``detections``), streaming.

    Reads one file at a time, synchronously: pyarrow's dataset scanner reads ahead of a slow
    consumer (this loop converts to Python) and its peak memory grew with the dataset
    (measured: 436 MB for 160k detections, 710 MB for 480k); this stays flat. Without
    ``soft_masks`` the detections come without their stored soft masks (``soft_mask`` is
    None), which saves making a bytes object per detection when no mask is re-pasted.
    """
    for path in prediction_files(predictions_dir):
        yield from ok_rows_of_file(predictions_dir, path, batch_rows, soft_masks)


def ok_rows_of_file(predictions_dir: str, path: str, batch_rows: int = 256,
                    soft_masks: bool = True) -> Iterator[dict]:
    """``iter_ok_rows`` for one prediction file ``path`` of ``predictions_dir``."""
    fs, _ = storage.resolve(predictions_dir)
    columns = ["image_id", "file_name", "width", "height", "status", "detections"]
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            if not soft_masks:
                batch = without_soft_masks(batch)
            for row in batch.to_pylist():
                if row["status"] == schema.STATUS_OK:
                    yield row


def without_soft_masks(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every detection's ``soft_mask`` and ``parts`` (tiled images: what the
    masks are re-pasted from) null; the list's layout unchanged."""
    detections = batch.column("detections")
    structs = detections.values
    fields = [child if field.name not in ("soft_mask", "parts") else
              pa.nulls(len(structs), field.type)
              for field, child in zip(structs.type, structs.flatten())]
    stripped = pa.StructArray.from_arrays(fields, fields=list(structs.type),
                                          mask=structs.is_null())
    lists = pa.ListArray.from_arrays(detections.offsets, stripped,
                                     mask=detections.is_null())
    return batch.set_column(batch.schema.get_field_index("detections"), "detections", lists)


def select_detections(row: dict, options: ExportOptions, settings: schema.RunSettings,
                      counts: ExportCounts) -> list[dict]:
    """The detections of one ok row that go into the COCO files, with their final masks.

    Applies, in order: score threshold, class filter, the run's categories, new mask
    threshold, empty and small masks, ``max_per_image`` (highest scores first), then polygons.
    Box-only detections (no segmentation) get COCO's box-only ``area``, the box's.
    """
    kept = []
    category_ids = settings.categories.ids
    rethreshold_masks = options.repastes_masks(settings)
    for det in row["detections"] or []:
        counts.detections += 1
        if det["score"] < options.score_threshold:
            counts.below_threshold += 1
            continue
        if options.classes is not None and det["category_id"] not in options.classes:
            counts.other_classes_left_out += 1
            continue
        if det["category_id"] not in category_ids:
            counts.unknown_category_left_out += 1
            continue
        kept.append(det if det["segmentation"] is not None else
                    {**det, "area": box_area(det["bbox"])})
    if rethreshold_masks:   # every mask of the image in one compiled pass
        from segpipe.encode import rethreshold   # numba: only imported to re-paste

        with_masks = [k for k, det in enumerate(kept) if det["segmentation"] is not None]
        new_masks = rethreshold([kept[k] for k in with_masks], row["height"], row["width"],
                                options.mask_threshold, settings.soft_mask_dtype)
        for k, (area, segmentation) in zip(with_masks, new_masks):
            kept[k] = {**kept[k], "area": area, "segmentation": segmentation}
    chosen = []
    for det in kept:
        if det["segmentation"] is not None and det["area"] == 0:
            counts.empty_masks_left_out += 1
        elif det["area"] < options.min_area:
            counts.small_masks_left_out += 1
        else:
            chosen.append(det)
    kept = chosen
    if options.max_per_image is not None and len(kept) > options.max_per_image:
        kept.sort(key=lambda d: -d["score"])
        counts.over_max_per_image += len(kept) - options.max_per_image
        kept = kept[:options.max_per_image]
    if options.polygons:
        for det in kept:
            if det["segmentation"] is not None:
                det["segmentation"], holes = mask_polygons(det["segmentation"])
                counts.masks_with_holes += holes
        counts.no_polygon_left_out += sum(1 for det in kept if det["segmentation"] == [])
        kept = [det for det in kept if det["segmentation"] != []]
    return kept


def box_area(bbox: list[float]) -> float:
    """COCO's ``area`` of a box-only annotation: the box's width × height."""
    return float(bbox[2]) * float(bbox[3])


def mask_polygons(rle: dict) -> tuple[list[list[float]], bool]:
    """COCO polygons of the mask ``rle`` that trace its pixel edges, so that pycocotools
    rasterises them back to exactly the mask's pixels, holes included.

    One polygon per 8-connected part (rasterio's GDAL polygonize), with vertices on pixel
    corners. COCO has no polygon holes, so a part with holes is one "keyhole" ring: its outline,
    then each hole reached along a zero-width cut and walked round, and back along the same cut.
    The cut's two edges cancel under both the even-odd and the nonzero fill rule (GDAL winds
    holes opposite to outlines), so the holes stay holes. The second value says whether the
    mask had any.
    """
    from pycocotools import mask as mask_utils
    from rasterio import features

    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    crop = np.ascontiguousarray(mask_utils.decode(rle)[y:y + h, x:x + w], dtype=np.uint8)
    polygons, holes = [], False
    for geometry, _ in features.shapes(crop, mask=crop.astype(bool), connectivity=8):
        rings = [[(px + x, py + y) for px, py in ring[:-1]] for ring in geometry["coordinates"]]
        holes |= len(rings) > 1
        polygons.append([float(v) for point in keyhole_ring(rings) for v in point])
    return polygons, holes


def keyhole_ring(rings: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """One ring from an outline and its holes: each hole joined to the outline's first vertex
    by a cut to its nearest vertex, walked round, and left along the same cut."""
    outline = rings[0]
    ring = list(outline)
    start = outline[0]
    for hole in rings[1:]:
        j = min(range(len(hole)),
                key=lambda k: (hole[k][0] - start[0]) ** 2 + (hole[k][1] - start[1]) ** 2)
        ring += [start, *hole[j:], *hole[:j], hole[j]]
    return ring


def mask_boxes_and_areas(detections: list[dict], height: int,
                         width: int) -> list[tuple[Optional[list[float]], Optional[int]]]:
    """The tight ``[x, y, w, h]`` box and pixel count of each detection's segmentation as
    pycocotools rasterises it: for RLE the stored ``area`` (the mask's pixels) and one
    ``toBbox`` call for the image's masks; polygons are rasterised. ``(None, None)`` for
    box-only detections."""
    from pycocotools import mask as mask_utils

    out: list[tuple[Optional[list[float]], Optional[int]]] = [(None, None)] * len(detections)
    rle_at = [k for k, d in enumerate(detections) if isinstance(d["segmentation"], dict)]
    if rle_at:
        boxes = mask_utils.toBbox([detections[k]["segmentation"] for k in rle_at]).tolist()
        for k, box in zip(rle_at, boxes):
            out[k] = (box, detections[k]["area"])
    for k, det in enumerate(detections):
        if isinstance(det["segmentation"], list):
            rle = mask_utils.merge(mask_utils.frPyObjects(det["segmentation"], height, width))
            out[k] = ([float(v) for v in mask_utils.toBbox(rle)], int(mask_utils.area(rle)))
    return out


class JsonArrayWriter:
    """Write the items of one JSON array to a stream as they come, a few at a time (``flush``
    writes what is held: the caller flushes after each image and before the array's end)."""

    #: Items held before they are written whatever the caller does.
    HOLD = 1000

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.count = 0
        self._held: list[str] = []

    def write(self, item: Any) -> None:
        self.write_json(_ENCODER.encode(item))

    def write_json(self, text: str) -> None:
        """Write one item given as JSON text."""
        self._held.append(text)
        self.count += 1
        if len(self._held) >= self.HOLD:
            self.flush()

    def flush(self) -> None:
        if self._held:
            first = self.count == len(self._held)
            self.stream.write(((("\n" if first else ",\n") + ",\n".join(self._held))
                               .encode("utf-8")))
            self._held = []


#: One encoder for every item (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def coco_info(description: str, extra: Optional[dict] = None) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"description": description, "version": __version__, "year": now.year,
            "contributor": "segpipe", "url": "", "date_created": now.isoformat(timespec="seconds"),
            **(extra or {})}


def export_coco(predictions_dir: str, coco_dir: str, options: ExportOptions,
                settings: schema.RunSettings, info: Optional[dict] = None,
                images: Optional[pa.Table] = None, show_progress: bool = False,
                parallel: bool = False) -> ExportCounts:
    """Write ``coco_dir/instances.json`` and ``coco_dir/results.json`` from predictions.

    Both files hold the same detections, chosen by ``select_detections``; ``images`` lists the
    images that decoded and were predicted. ``images`` is ``read_image_table(predictions_dir)``
    when the caller has it already. The entries are made by ``rows_part``: in this process,
    image by image, or with ``parallel`` one prediction file per Ray task (Ray must be
    initialised), written in file order either way, so the files are the same. The
    ``categories`` list is the run's category table;
    box-only detections have no ``segmentation`` key.
    """
    if images is None:
        images = read_image_table(predictions_dir)
    counts = ExportCounts(images=images.num_rows)
    ok_images = images.filter(pc.field("status") == schema.STATUS_OK)
    counts.ok = ok_images.num_rows
    counts.errors = counts.images - counts.ok
    per_category: Counter = Counter()
    fs, root = storage.resolve(coco_dir)
    ownership.remove(coco_dir, ownership.stale_temporaries(coco_dir, COCO_FILES))
    with contextlib.ExitStack() as stack:
        instances = stack.enter_context(storage.atomic_output(fs, storage.join(root, COCO_FILES[0])))
        results = stack.enter_context(storage.atomic_output(fs, storage.join(root, COCO_FILES[1])))
        instances.write(b'{"info":' + storage.redact(
            _dumps(info or coco_info("segpipe predictions")).decode()).encode())
        instances.write(b',"licenses":[],"categories":'
                        + _dumps(settings.categories.coco_json()))
        instances.write(b',"images":[')
        image_writer = JsonArrayWriter(instances)
        for row in ok_images.select(["image_id", "file_name", "width", "height"]).to_pylist():
            image_writer.write({"id": row["image_id"], "file_name": row["file_name"],
                                "width": row["width"], "height": row["height"]})
        image_writer.flush()
        instances.write(b'\n],"annotations":[')
        annotation_writer = JsonArrayWriter(instances)
        results.write(b"[")
        result_writer = JsonArrayWriter(results)
        progress = stack.enter_context(Progress(f"writing {coco_dir}", counts.ok,
                                                enabled=show_progress))
        if parallel:
            parts = file_parts_on_ray(predictions_dir, options, settings)
        else:   # image by image, streaming
            parts = (rows_part([row], options, settings) for row in
                     iter_ok_rows(predictions_dir, soft_masks=options.repastes_masks(settings)))
        for part in parts:
            for result, annotation in zip(part.results, part.annotations):
                result_writer.write_json(result)
                annotation_writer.write_json(f'{{"id":{annotation_writer.count + 1},'
                                             + annotation)
            result_writer.flush()
            annotation_writer.flush()
            counts.add(part.counts)
            per_category.update(part.per_category)
            progress.advance(part.images)
        instances.write(b"\n]}\n")
        results.write(b"\n]\n")
    ownership.record_written(coco_dir, COCO_FILES)
    counts.annotations = annotation_writer.count
    counts.per_category = dict(sorted(per_category.items(), key=lambda kv: (-kv[1], kv[0])))
    return counts


@dataclass
class ExportPart:
    """The COCO entries of some ok images (one image, or one prediction file's): each results
    entry and each annotation as JSON text (the annotation without its leading ``"id"``
    member, which the writer numbers), what was counted, and how many images there were."""

    results: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    counts: ExportCounts = field(default_factory=ExportCounts)
    per_category: Counter = field(default_factory=Counter)
    images: int = 0


def file_part(predictions_dir: str, path: str, options: ExportOptions,
              settings: schema.RunSettings) -> ExportPart:
    """``rows_part`` of one prediction file (what a Ray task of a parallel export does)."""
    return rows_part(ok_rows_of_file(predictions_dir, path,
                                     soft_masks=options.repastes_masks(settings)),
                     options, settings)


def rows_part(rows: Iterable[dict], options: ExportOptions,
              settings: schema.RunSettings) -> ExportPart:
    """Select, re-paste (at a new mask threshold) and write as JSON the detections of ok
    ``rows``."""
    part = ExportPart()
    for row in rows:
        selected = select_detections(row, options, settings, part.counts)
        boxes_and_areas = mask_boxes_and_areas(selected, row["height"], row["width"])
        for det, (box, area) in zip(selected, boxes_and_areas):
            mask = det["segmentation"] is not None
            head, tail = _result_members(row["image_id"], det)
            bbox = _box_json(det["bbox"])
            part.results.append(f"{{{head}{bbox}{tail}}}")
            if mask and options.instances_bbox == "mask":
                bbox = _box_json(box)
            part.annotations.append(f'{head}{bbox}{tail},'
                                    f'"area":{area if mask else det["area"]!r},"iscrowd":0}}')
            part.per_category[det["category_name"]] += 1
        part.images += 1
    return part


def file_parts_on_ray(predictions_dir: str, options: ExportOptions,
                      settings: schema.RunSettings) -> Iterator[ExportPart]:
    """``file_part`` of every prediction file in Ray tasks (one CPU each), yielded in file
    order; at most two tasks per CPU of the cluster are running or waiting to be written, so
    the driver holds a bounded number of parts."""
    import ray

    task = ray.remote(num_cpus=1)(file_part)
    paths = prediction_files(predictions_dir)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = [task.remote(predictions_dir, path, options, settings) for path in paths[:window]]
    for following in paths[window:] + [None] * min(window, len(paths)):
        part = ray.get(pending.pop(0))
        if following is not None:
            pending.append(task.remote(predictions_dir, following, options, settings))
        yield part


def coco_result(image_id: int, det: dict) -> dict:
    """One COCO results entry; box-only detections have no ``segmentation`` key."""
    result = {"image_id": image_id, "category_id": det["category_id"], "bbox": det["bbox"],
              "score": det["score"]}
    if det["segmentation"] is not None:
        result["segmentation"] = det["segmentation"]
    return result


def _result_members(image_id: int, det: dict) -> tuple[str, str]:
    """The JSON members of ``coco_result(image_id, det)`` before and after ``"bbox"``, written
    directly: ``json`` spends most of an export's time on these small, fixed-shape objects.
    Numbers are written as ``json`` writes them (``repr``)."""
    head = f'"image_id":{image_id},"category_id":{det["category_id"]},"bbox":'
    tail = f',"score":{det["score"]!r}'
    if det["segmentation"] is not None:
        tail += ',"segmentation":' + _segmentation_json(det["segmentation"])
    return head, tail


def _box_json(box: list[float]) -> str:
    return f"[{box[0]!r},{box[1]!r},{box[2]!r},{box[3]!r}]"


def _segmentation_json(segmentation: Any) -> str:
    """A COCO RLE (``{"size", "counts"}``) or polygons as JSON text."""
    if isinstance(segmentation, dict):
        height, width = segmentation["size"]
        return (f'{{"size":[{height},{width}],"counts":'
                f'{_ENCODER.encode(segmentation["counts"])}}}')
    return _ENCODER.encode(segmentation)


@dataclass(frozen=True)
class CheckedExport:
    """What ``check_export`` found: the run's predictions, their settings, the options."""

    predictions_dir: str
    settings: schema.RunSettings
    options: ExportOptions


def check_export(output: str, options: ExportOptions,
                 class_names: Optional[str] = None) -> CheckedExport:
    """Raise ``ConfigError`` for requests the stored predictions cannot answer; ``class_names``
    (comma-separated names or ids of the run's categories) sets ``options.classes``."""
    predictions_dir = existing_predictions(output)
    settings = read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    if class_names:
        options = replace(options, classes=settings.categories.parse_classes(class_names))
    if options.score_threshold < settings.model.score_floor:
        raise ConfigError(f"score threshold {options.score_threshold} is below the stored score "
                          f"floor {settings.model.score_floor}: detections under the floor were never "
                          "kept; rerun segment with a lower --score-floor")
    if not settings.model.has_masks and (options.polygons or options.mask_threshold is not None):
        flag = "--polygons" if options.polygons else "--mask-threshold"
        raise ConfigError(f"{flag} needs masks, but this run's detector ({settings.model.arch}) "
                          "finds boxes only")
    if options.repastes_masks(settings) and not settings.soft_masks:
        raise ConfigError(f"mask threshold {options.mask_threshold} differs from the run's "
                          f"{settings.mask_threshold}, but the run kept no soft masks "
                          "(--no-soft-masks); rerun segment with soft masks to re-threshold")
    if options.instances_bbox not in ("mask", "model"):
        raise ConfigError(f"instances bbox must be mask or model, got {options.instances_bbox!r}")
    if not 0.0 <= options.score_threshold < 1.0 or (
            options.mask_threshold is not None and not 0.0 <= options.mask_threshold < 1.0):
        raise ConfigError("thresholds must be in [0, 1)")
    return CheckedExport(predictions_dir, settings, options)


def run_export(output: str, to: str, options: ExportOptions, show_progress: bool = False,
               class_names: Optional[str] = None, address: Optional[str] = None,
               checked: Optional[CheckedExport] = None) -> dict:
    """``segpipe export``: write ``to/instances.json``, ``to/results.json`` and ``to/export.json``
    from ``output/predictions`` alone, after ``check_export`` (``checked``, when the caller ran
    it). With a Ray ``address`` the prediction files are exported in Ray tasks on that cluster
    (``export_coco(parallel=True)``)."""
    if checked is None:
        checked = check_export(output, options, class_names)
        check_export_target(to)
    predictions_dir, settings, options = checked.predictions_dir, checked.settings, checked.options
    ownership.mark_folder(to, "export")
    start = time.perf_counter()
    info = coco_info("segpipe export", {"arch": settings.model.arch,
                                        "weights_sha256": settings.weights_sha256})
    with contextlib.ExitStack() as stack:
        if address:
            from segpipe.cluster import ray_session

            stack.enter_context(ray_session(address))
        counts = export_coco(predictions_dir, to, options, settings, info,
                             show_progress=show_progress, parallel=bool(address))
    seconds = time.perf_counter() - start
    summary = {
        "segpipe": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": output,
        "asked": {**asdict(options), "classes": sorted(options.classes) if options.classes else None,
                  "mask_threshold": options.mask_threshold if options.mask_threshold is not None
                  else settings.mask_threshold},
        "run_settings": settings.to_json(),
        "counts": asdict(counts),
        "seconds": round(seconds, 3),
        "detections_per_s": round(counts.detections / seconds, 1) if seconds else None,
        "ray": address or None,
    }
    ownership.write_json(to, EXPORT_JSON, summary)
    return summary


def check_export_target(to: str) -> None:
    """Refuse a ``--to`` folder export cannot write (a file, no permission), a link on the
    way, or files there that export would replace and segpipe did not write."""
    check_folder_target(to, "--to", " (export writes instances.json, results.json and "
                                    "export.json into it)")
    ownership.refuse_links(to, [LOGS_DIR], "export writes its log there")
    ownership.check_replaceable(to, (*COCO_FILES, EXPORT_JSON))

"""Write COCO ``instances.json`` and ``results.json`` from ``predictions/``, streaming.

Reads the Parquet predictions only (never a model or an image). The image table (a few small
columns per image) is read whole and sorted by ``file_name``; detections are streamed batch by
batch straight into both JSON files, which are written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from segpipe import __version__, schema, storage
from segpipe.categories import COCO_CATEGORY_IDS, coco_categories_json
from segpipe.sinks import prediction_files

IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "status", "error"]


@dataclass
class ExportCounts:
    """What an export read and wrote."""

    images: int = 0
    ok: int = 0
    errors: int = 0
    detections: int = 0              # rows' detections (>= the run's score floor)
    annotations: int = 0             # written: score >= threshold and a non-empty mask
    below_threshold: int = 0
    empty_masks_left_out: int = 0    # score >= threshold but no pixel above the mask threshold
    unknown_category_left_out: int = 0  # a label in COCO's id gaps ("N/A"): not a COCO category
    per_category: dict[str, int] = field(default_factory=dict)


def predictions_dataset(predictions_dir: str) -> pads.Dataset:
    """A pyarrow dataset over the complete prediction files of ``predictions_dir``."""
    fs, _ = storage.resolve(predictions_dir)
    return pads.dataset(prediction_files(predictions_dir), format="parquet", filesystem=fs,
                        schema=schema.PREDICTION_SCHEMA)


def read_image_table(predictions_dir: str) -> pa.Table:
    """One row per image (no detections), sorted by ``file_name``."""
    table = predictions_dataset(predictions_dir).to_table(columns=IMAGE_COLUMNS)
    return table.sort_by("file_name")


def iter_detections(predictions_dir: str, batch_rows: int = 256) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(image_id, detections)`` for every ok image, streaming over the files."""
    dataset = predictions_dataset(predictions_dir)
    for batch in dataset.to_batches(columns=["image_id", "status", "detections"],
                                    filter=pc.field("status") == schema.STATUS_OK,
                                    batch_size=batch_rows):
        ids = batch.column("image_id").to_pylist()
        for image_id, detections in zip(ids, batch.column("detections").to_pylist()):
            yield image_id, detections or []


class JsonArrayWriter:
    """Write the items of one JSON array to a stream as they come."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.count = 0

    def write(self, item: Any) -> None:
        self.stream.write((b",\n" if self.count else b"\n") + _dumps(item))
        self.count += 1


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def coco_info(description: str, extra: Optional[dict] = None) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"description": description, "version": __version__, "year": now.year,
            "contributor": "segpipe", "url": "", "date_created": now.isoformat(timespec="seconds"),
            **(extra or {})}


def export_coco(predictions_dir: str, coco_dir: str, score_threshold: float,
                info: Optional[dict] = None, images: Optional[pa.Table] = None) -> ExportCounts:
    """Write ``coco_dir/instances.json`` and ``coco_dir/results.json`` from predictions.

    Annotations and results hold the detections with ``score >= score_threshold``, a
    non-empty mask and a COCO category (not one of the "N/A" ids in COCO's gaps); images lists the images that decoded and were predicted. ``images`` is
    ``read_image_table(predictions_dir)`` when the caller has it already.
    """
    if images is None:
        images = read_image_table(predictions_dir)
    counts = ExportCounts(images=images.num_rows)
    ok_images = images.filter(pc.field("status") == schema.STATUS_OK)
    counts.ok = ok_images.num_rows
    counts.errors = counts.images - counts.ok
    per_category: Counter = Counter()
    fs, root = storage.resolve(coco_dir)
    with contextlib.ExitStack() as stack:
        instances = stack.enter_context(storage.atomic_output(fs, storage.join(root, "instances.json")))
        results = stack.enter_context(storage.atomic_output(fs, storage.join(root, "results.json")))
        instances.write(b'{"info":' + _dumps(info or coco_info("segpipe predictions")))
        instances.write(b',"licenses":[],"categories":' + _dumps(coco_categories_json()))
        instances.write(b',"images":[')
        image_writer = JsonArrayWriter(instances)
        for row in ok_images.select(["image_id", "file_name", "width", "height"]).to_pylist():
            image_writer.write({"id": row["image_id"], "file_name": row["file_name"],
                                "width": row["width"], "height": row["height"]})
        instances.write(b'\n],"annotations":[')
        annotation_writer = JsonArrayWriter(instances)
        results.write(b"[")
        result_writer = JsonArrayWriter(results)
        for image_id, detections in iter_detections(predictions_dir):
            for det in detections:
                counts.detections += 1
                if det["score"] < score_threshold:
                    counts.below_threshold += 1
                    continue
                if det["area"] == 0:
                    counts.empty_masks_left_out += 1
                    continue
                if det["category_id"] not in COCO_CATEGORY_IDS:
                    counts.unknown_category_left_out += 1
                    continue
                result = {"image_id": image_id, "category_id": det["category_id"],
                          "bbox": det["bbox"], "score": det["score"],
                          "segmentation": det["segmentation"]}
                result_writer.write(result)
                annotation_writer.write({"id": annotation_writer.count + 1, **result,
                                         "area": det["area"], "iscrowd": 0})
                per_category[det["category_name"]] += 1
        instances.write(b"\n]}\n")
        results.write(b"\n]\n")
    counts.annotations = annotation_writer.count
    counts.per_category = dict(sorted(per_category.items(), key=lambda kv: (-kv[1], kv[0])))
    return counts

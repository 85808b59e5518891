"""Write a run's COCO files (``instances`` and ``results``, in shards) from ``predictions/``.

Reads the Parquet predictions only (never a model or an image). The image table (a few small
columns per image, ``read_image_table``) is read whole and cut into shards (``coco.shards``);
each shard is written in two steps, which Ray tasks run in parallel when asked:

1. ``write_shard_entries`` streams the shard's rows in ``file_name`` order, selects their
   detections, writes the shard's results file and its annotations (without ids, one a line)
   to a temporary file, and counts them;
2. once every shard is counted, annotation ids are known (they count up from 1 across the
   shards), and ``write_shard_instances`` writes the shard's instances file from the
   temporary one.

Every file is written atomically; ``index.json`` is written last. Nothing in the files
depends on time, the order of prediction files or the number of writers.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segpipe import schema
from segpipe.annotations.fanout import run_calls
from segpipe.annotations.formats import ExportFormat
from segpipe.annotations.jsonstream import ENCODER, JsonArrayWriter, dumps
from segpipe.annotations.selection import (
    ExportCounts,
    ExportOptions,
    image_counts,
    mask_boxes_and_areas,
    select_detections,
)
from segpipe.coco.shards import (
    INDEX_NAME,
    Shard,
    index_entry,
    make_index,
    plan_shards,
    read_index,
)
from segpipe.config import DEFAULT_COCO_SHARD_IMAGES
from segpipe.io import ownership, storage
from segpipe.model.settings import RunSettings
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE
from segpipe.output.predictions import LOCATION_COLUMNS, read_image_table, rows_in_order
from segpipe.output.run_folder import COCO_FILES, COCO_NAME, prediction_files
from segpipe.progress import Progress
from segpipe.version import __version__


def coco_info(settings: RunSettings, options: ExportOptions) -> dict:
    """The ``info`` of a COCO file: what made it and at which thresholds; no time (the same
    predictions give the same bytes; ``run.json`` and ``export.json`` say when)."""
    random = {"random_weights": True} if settings.random_weights else {}
    return {"description": RANDOM_WEIGHTS_NOTE if random else "segpipe predictions",
            "version": __version__, "contributor": "segpipe", "url": "", **random,
            "arch": settings.model.arch, "weights_sha256": settings.weights_sha256,
            "score_threshold": options.score_threshold,
            "mask_threshold": (options.mask_threshold if options.mask_threshold is not None
                               else settings.mask_threshold)}


@dataclass
class ShardEntries:
    """What ``write_shard_entries`` wrote and counted for one shard: ``body`` is the temporary
    file of its annotations (JSON objects without their ``"id"`` member, one a line)."""

    body: str
    annotations: int = 0
    counts: ExportCounts = field(default_factory=ExportCounts)
    per_category: Counter = field(default_factory=Counter)


#: Rows whose entries are made together (``rows_part``) before they are written.
ROWS_PER_PART = 64


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shard_entries(predictions_dir: str, files: list[str], shard: Shard,
                        options: ExportOptions, settings: RunSettings,
                        coco_dir: str) -> ShardEntries:
    """Step 1 for ``shard``: its results file, and its annotations in a temporary file."""
    fs, root = storage.resolve(coco_dir)
    entries = ShardEntries(storage.temporary_name(storage.join(root, shard.instances)))
    rows = rows_in_order(predictions_dir, files, shard.images, settings,
                         soft_masks=options.repastes_masks(settings))
    try:
        with storage.atomic_output(fs, storage.join(root, shard.results)) as results, \
                fs.open_output_stream(entries.body) as body:
            results.write(b"[")
            result_writer = JsonArrayWriter(results)
            for some_rows in batched(rows, ROWS_PER_PART):
                part = rows_part(some_rows, options, settings)
                for result in part.results:
                    result_writer.write_json(result)
                if part.annotations:
                    body.write(("\n".join(part.annotations) + "\n").encode("utf-8"))
                entries.annotations += len(part.annotations)
                entries.counts.add(part.counts)
                entries.per_category.update(part.per_category)
            result_writer.flush()
            results.write(b"\n]\n")
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(entries.body)
        raise
    return entries


def write_shard_instances(coco_dir: str, shard: Shard, entries: ShardEntries,
                          first_annotation_id: int, header: bytes) -> None:
    """Step 2 for ``shard``: its instances file (``header`` holds info, licenses and
    categories), numbering its annotations from ``first_annotation_id``; the temporary file of
    step 1 is removed."""
    fs, root = storage.resolve(coco_dir)
    try:
        with storage.atomic_output(fs, storage.join(root, shard.instances)) as instances:
            instances.write(header + b',"images":[')
            image_writer = JsonArrayWriter(instances)
            columns = shard.images.select(["image_id", "file_name", "width", "height"])
            for batch in columns.to_batches(max_chunksize=JsonArrayWriter.HOLD):
                for row in batch.to_pylist():
                    image_writer.write({"id": row["image_id"], "file_name": row["file_name"],
                                        "width": row["width"], "height": row["height"]})
            image_writer.flush()
            instances.write(b'\n],"annotations":[')
            annotation_writer = JsonArrayWriter(instances)
            number = first_annotation_id
            with fs.open_input_stream(entries.body) as body:
                for line in _lines(body):
                    annotation_writer.write_encoded(b'{"id":%d,%s' % (number, line))
                    number += 1
            annotation_writer.flush()
            instances.write(b"\n]}\n")
    finally:
        with contextlib.suppress(OSError):
            fs.delete_file(entries.body)
    if number - first_annotation_id != entries.annotations:
        raise RuntimeError(f"{shard.instances}: {number - first_annotation_id} annotations "
                           f"read back, {entries.annotations} written")


def _lines(stream, block: int = 1 << 18) -> Iterator[bytes]:
    """The lines of a binary stream, without their ends."""
    tail = b""
    while True:
        data = stream.read(block)
        if not data:
            break
        *complete, tail = (tail + data).split(b"\n")
        yield from complete
    if tail:
        yield tail


def export_coco(predictions_dir: str, coco_dir: str, options: ExportOptions,
                settings: RunSettings, images: Optional[pa.Table] = None,
                files: Optional[list[str]] = None, show_progress: bool = False,
                parallel: bool = False,
                shard_images: int = DEFAULT_COCO_SHARD_IMAGES) -> ExportCounts:
    """Write the COCO shards of ``predictions_dir`` and their ``index.json`` into ``coco_dir``.

    Both files of a shard hold the same detections, chosen by ``select_detections``; its
    images are the ok images (decoded and predicted) of its part of the run. ``images`` is
    ``read_image_table(predictions_dir, files)`` when the caller has it already. With
    ``parallel`` (Ray initialised) each shard's steps run in Ray tasks; the files are the same
    either way. Files of an earlier export into ``coco_dir`` that this one does not write
    again (other shards) are removed, being segpipe's (``ownership``); box-only detections
    have no ``segmentation`` key.
    """
    files = prediction_files(predictions_dir) if files is None else files
    if images is None:
        images = read_image_table(predictions_dir, files)
    counts = image_counts(images)
    ok_images = images.filter(pc.field("status") == schema.STATUS_OK).select(
        ["image_id", "file_name", "width", "height", *LOCATION_COLUMNS])
    shards = plan_shards(ok_images, shard_images)
    fs, root = storage.resolve(coco_dir)
    fs.create_dir(root, recursive=True)
    ownership.remove(coco_dir, ownership.stale_temporaries(coco_dir, [COCO_NAME]))
    ownership.remove_recorded(coco_dir, [INDEX_NAME])   # until every shard is written again
    header = (b'{"info":' + storage.redact(dumps(coco_info(settings, options)).decode()).encode()
              + b',"licenses":[],"categories":' + dumps(settings.categories.coco_json()))
    def run(function: Callable, calls: list[tuple]) -> Iterator[Any]:
        return run_calls(function, calls, parallel)

    with Progress(f"writing {coco_dir}", counts.ok, enabled=show_progress) as progress:
        written = []
        for shard, entries in zip(shards, run(write_shard_entries, [
                (predictions_dir, files, shard, options, settings, coco_dir) for shard in shards])):
            written.append(entries)
            progress.advance(shard.images.num_rows)
        # annotation ids count up from 1 across the shards, in order
        firsts = [1 + before for before in accumulate([0] + [e.annotations for e in written[:-1]])]
        list(run(write_shard_instances, [(coco_dir, shard, entries, first, header)
                                         for shard, entries, first in zip(shards, written, firsts)]))
    index = make_index(shard_images, [index_entry(shard, entries.annotations, first) for
                                      shard, entries, first in zip(shards, written, firsts)])
    names = [name for shard in shards for name in (shard.instances, shard.results)]
    ownership.record_written(coco_dir, names)
    earlier = ownership.recorded(coco_dir) or {}
    ownership.remove_recorded(coco_dir, [name for name in earlier if COCO_NAME.fullmatch(name)
                                         and name not in names])
    ownership.write_json(coco_dir, INDEX_NAME, index)
    per_category: Counter = Counter()
    for entries in written:
        counts.add(entries.counts)
        per_category.update(entries.per_category)
    counts.annotations = index["annotations"]
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


def rows_part(rows: Iterable[dict], options: ExportOptions,
              settings: RunSettings) -> ExportPart:
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
            if box is not None and options.instances_bbox == "mask":
                bbox = _box_json(box)
            part.annotations.append(f'{head}{bbox}{tail},'
                                    f'"area":{area if mask else det["area"]!r},"iscrowd":0}}')
            part.per_category[det["category_name"]] += 1
        part.images += 1
    return part


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
                f'{ENCODER.encode(segmentation["counts"])}}}')
    return ENCODER.encode(segmentation)


# The COCO export format (``annotations.formats``).

WRITES = "instances.json, results.json (or their shards), index.json"


def check_request(request: ExportFormat) -> None:
    """COCO asks nothing beyond the detections."""


def check_target(to: str) -> None:
    """Refuse to replace COCO files in ``to`` that segpipe did not write (its shards too)."""
    ownership.check_replaceable(to, COCO_FILES, matching=COCO_NAME)


def write(predictions_dir: str, to: str, options: ExportOptions, settings: RunSettings,
          request: ExportFormat, parallel: bool, show_progress: bool) -> tuple[ExportCounts, dict]:
    """The COCO files of the run in ``to`` (in shards of ``request.shard_images`` images); what
    export.json says of them: the shard size and how many shards."""
    counts = export_coco(predictions_dir, to, options, settings, show_progress=show_progress,
                         parallel=parallel, shard_images=request.shard_images)
    return counts, {"coco_shard_images": request.shard_images,
                    "shards": len((read_index(to) or {"shards": []})["shards"])}


def notes(summary: dict, to: str) -> list[str]:
    """How many shards were written, when there are several."""
    shards = summary.get("shards", 1)
    return [f"{shards} shards, listed by {to.rstrip('/')}/index.json"] if shards > 1 else []

"""Choose the detections a COCO file gets: thresholds, classes, limits, areas; count what is left out and why."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from segpipe import schema
from segpipe.annotations.polygons import mask_polygons
from segpipe.model.settings import RunSettings
from segpipe.output.damage import DAMAGED_KEY, NAMED, damaged_image_notes


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

    def repastes_masks(self, settings: RunSettings) -> bool:
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
    damaged_left_out: int = 0           # detections damaged in predictions/ (io.damage)
    damaged_images: int = 0             # ok image rows damaged in predictions/: not exported
    damaged: list[str] = field(default_factory=list)   # the first damaged ones, in words
    per_category: dict[str, int] = field(default_factory=dict)

    def add(self, other: "ExportCounts") -> None:
        """Add ``other``'s detection counts (an export of more files) to these."""
        for name in _DETECTION_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.damaged = (self.damaged + other.damaged)[:NAMED]

    def note_damaged(self, lines: list[str], images: bool = False) -> None:
        """Count damaged detections (or image rows) and name the first few."""
        if images:
            self.damaged_images += len(lines)
        else:
            self.damaged_left_out += len(lines)
        self.damaged = (self.damaged + [line for line in lines if line])[:NAMED]

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
            (self.damaged_left_out, "damaged in predictions/ (not as segpipe writes them)"),
        ]
        return [(n, reason) for n, reason in reasons if n]


#: The fields of ``ExportCounts`` that count detections (what ``add`` adds).
_DETECTION_COUNTS = tuple(f.name for f in fields(ExportCounts)
                          if f.name not in ("images", "ok", "errors", "per_category",
                                            "damaged_images", "damaged"))


def image_counts(images: pa.Table) -> ExportCounts:
    """The image counts of an export of the image table ``images`` (``read_image_table``'s):
    all, ok and error rows, and the ok rows damaged in predictions/, named."""
    ok = pc.sum(pc.equal(images.column("status"), schema.STATUS_OK)).as_py() or 0
    counts = ExportCounts(images=images.num_rows, ok=ok, errors=images.num_rows - ok)
    damaged, named = damaged_image_notes(images)
    counts.damaged_images, counts.damaged = damaged, named
    return counts


def select_detections(row: dict, options: ExportOptions, settings: RunSettings,
                      counts: ExportCounts) -> list[dict]:
    """The detections of one ok row that go into the COCO files, with their final masks.

    Counts the damaged detections the reader took out (``io.damage``), then applies, in order: score
    threshold, class filter, the run's categories, new mask threshold, empty and small masks,
    ``max_per_image`` (highest scores first), then polygons. Box-only detections (no
    segmentation) get COCO's box-only ``area``, the box's.
    """
    kept = []
    category_ids = settings.categories.ids
    new_mask_threshold = options.mask_threshold if options.repastes_masks(settings) else None
    if DAMAGED_KEY in row:   # taken out by the reader (io.predictions.checked_rows)
        counts.detections += len(row[DAMAGED_KEY])
        counts.note_damaged(row[DAMAGED_KEY])
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
    if new_mask_threshold is not None:   # every mask of the image in one compiled pass
        from segpipe.encode.encoder import rethreshold

        with_masks = [k for k, det in enumerate(kept) if det["segmentation"] is not None]
        new_masks = rethreshold([kept[k] for k in with_masks], row["height"], row["width"],
                                new_mask_threshold, settings.soft_mask_dtype,
                                settings.model.mask_frame)
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

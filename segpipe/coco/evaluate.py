"""COCO evaluation of stored predictions: match ground-truth images and categories to a run's,
collect the results, and run pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Optional

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe import schema
from segpipe.annotations.selection import ExportCounts, ExportOptions, select_detections
from segpipe.coco.writer import coco_result
from segpipe.config import ConfigError
from segpipe.model.categories import CategoryTable
from segpipe.model.settings import RunSettings
from segpipe.output.predictions import iter_ok_rows, read_image_table

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("segm", "bbox")


@dataclass
class CategoryMatch:
    """How ground-truth category ids relate to the run's category ids."""

    how: str                             # "by id" | "by name"
    to_gt: dict[int, int]                # the run's category id → ground-truth id
    message: Optional[str] = None


def match_categories(gt_categories: list[dict], table: CategoryTable) -> CategoryMatch:
    """Map the run's category ids to the ground truth's; ``ConfigError`` if impossible."""
    ours_by_name = {c.name.lower(): c.id for c in table.categories}
    ours_names = {c.id: c.name.lower() for c in table.categories}
    gt = {int(c["id"]): str(c.get("name", "")).lower() for c in gt_categories}
    if all(ours_names.get(i) == name for i, name in gt.items()):
        return CategoryMatch("by id", {i: i for i in gt})
    known = {i: ours_by_name[n] for i, n in gt.items() if n in ours_by_name}
    if known and len(known) == len(gt):
        shifted = sorted(i for i, ours in known.items() if i != ours) or sorted(known)
        hint = "; 80 contiguous ids?" if table.origin == "coco" else ""
        return CategoryMatch(
            "by name", {ours: i for i, ours in known.items()},
            f"ground-truth category ids differ from this run's for {len(shifted)} of {len(gt)} "
            f"categories (e.g. {gt[shifted[0]]!r} is {shifted[0]} there, {known[shifted[0]]} in "
            f"this run{hint}): matched categories by name")
    if table.origin == "coco" and sorted(gt) == list(range(1, 81)):
        raise ConfigError("ground truth uses 80 contiguous category ids whose names are not COCO "
                          "names; give it COCO ids (1..90) or COCO category names")
    unknown = sorted(n for i, n in gt.items() if i not in known)[:5]
    raise ConfigError(f"ground-truth categories {unknown} are not among this run's "
                      f"{table.describe()}: cannot match them to the model's classes")


@dataclass
class ImageMatch:
    """Ground-truth images against the predictions of a run."""

    pred_by_gt: dict[int, int] = field(default_factory=dict)   # gt image id → prediction image id
    not_predicted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)


def match_images(gt_images: list[dict], predictions_dir: str) -> ImageMatch:
    """Match by ``file_name``; a ground-truth name may also match the end of a relative path."""
    table = read_image_table(predictions_dir).to_pylist()
    by_name = {r["file_name"]: r for r in table}
    by_base: dict[str, list[dict]] = {}
    for r in table:
        by_base.setdefault(r["file_name"].rsplit("/", 1)[-1], []).append(r)
    match = ImageMatch()
    for image in gt_images:
        name = image["file_name"]
        row = by_name.get(name)
        if row is None and len(by_base.get(name.rsplit("/", 1)[-1], [])) == 1:
            row = by_base[name.rsplit("/", 1)[-1]][0]
        if row is None:
            match.not_predicted.append(name)
        elif row["status"] != schema.STATUS_OK:
            match.failed.append(f"{name}: {row['error']}")
        elif (row["width"], row["height"]) != (image.get("width"), image.get("height")):
            match.size_mismatch.append(f"{name}: ground truth {image.get('width')}x"
                                       f"{image.get('height')}, predicted {row['width']}x"
                                       f"{row['height']}")
        else:
            match.pred_by_gt[int(image["id"])] = row["image_id"]
    return match


def collect_results(predictions_dir: str, images: ImageMatch, categories: CategoryMatch,
                    score_threshold: float, settings: RunSettings,
                    counts: Optional[ExportCounts] = None) -> list[dict]:
    """COCO results for the matched images, with ground-truth image and category ids.

    The detections are those ``segpipe export`` would write at ``score_threshold``;
    ``counts`` gets what was left out (damaged detections among them).
    """
    gt_by_pred = {p: g for g, p in images.pred_by_gt.items()}
    options = ExportOptions(score_threshold=score_threshold)
    counts = ExportCounts() if counts is None else counts
    results = []
    for row in iter_ok_rows(predictions_dir, settings, soft_masks=False):   # scores and masks only
        gt_id = gt_by_pred.get(row["image_id"])
        if gt_id is None:
            continue
        for det in select_detections(row, options, settings, counts):
            category = categories.to_gt.get(det["category_id"])
            if category is None:
                continue
            results.append({**coco_result(gt_id, det), "category_id": category})
    return results


def evaluate(gt: COCO, results: list[dict], image_ids: list[int], iou_type: str) -> tuple[dict, str]:
    """COCOeval's 12 numbers (as a dict) and its printed table."""
    if not results:
        return {name: 0.0 for name in STAT_NAMES}, "(no detections to evaluate)\n"
    table = io.StringIO()
    with contextlib.redirect_stdout(table):   # pycocotools prints as it loads and evaluates
        detections = gt.loadRes(results)
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    return stats, "\n".join(l for l in table.getvalue().splitlines() if "Average" in l) + "\n"


def own_export(gt_json: dict, settings: RunSettings) -> Optional[str]:
    """What to tell a user evaluating a run against segpipe's own COCO export of the same
    weights (``None`` when the ground truth is something else)."""
    info = gt_json.get("info")
    if not isinstance(info, dict) or info.get("contributor") != "segpipe" or \
            info.get("weights_sha256") != settings.weights_sha256:
        return None
    return ("the ground truth is segpipe's own export of predictions of these weights: its masks "
            "are the detections themselves, so segm AP near 1 says nothing of the model, and "
            "its boxes are the masks' tight boxes (export --instances-bbox mask), not the "
            "model's, so bbox AP measures how far the model's boxes are from its own masks")


def crowd_regions(gt_json: dict, as_objects: bool) -> Optional[str]:
    """What to tell a user about ``iscrowd=1`` ground truth (``None``: nothing to tell).

    COCOeval ignores crowd regions, so a ground truth whose annotations are all crowd (as
    datumaro's mask export writes them) scores every AP as -1. With ``as_objects`` they are
    turned into ordinary objects (in ``gt_json``). An annotation without ``iscrowd`` (some
    converters leave it out; pycocotools fails on it) is an object: given ``iscrowd`` 0."""
    annotations = gt_json["annotations"]
    unmarked = [a for a in annotations if "iscrowd" not in a]
    for a in unmarked:
        a["iscrowd"] = 0
    said = [f"{len(unmarked)} ground-truth annotations without iscrowd (the first: id "
            f"{unmarked[0]['id']}) were evaluated as objects (iscrowd 0)"] if unmarked else []
    crowd = [a for a in annotations if a["iscrowd"]]
    if crowd and as_objects:
        for a in crowd:
            a["iscrowd"] = 0
        said.append(f"{len(crowd)} ground-truth annotations marked iscrowd=1 were evaluated "
                    "as ordinary objects (--crowd-as-objects)")
    elif crowd and len(crowd) == len(annotations):
        said.append(f"all {len(crowd)} ground-truth annotations are iscrowd=1 (crowd regions; "
                    "datumaro's mask export writes them so): COCOeval ignores crowd regions, so "
                    "every AP is -1. If they are single objects, pass --crowd-as-objects")
    return "; ".join(said) or None

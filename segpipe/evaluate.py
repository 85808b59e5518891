"""``segpipe eval``: COCO AP of a run's predictions against a user's ground truth.

Ground-truth images are matched to predictions by ``file_name`` (the user's ids are their own).
Categories are matched by the run's category ids (COCO's, or the run's categories file); when
the ground truth numbers the same names differently (80 contiguous ids, as detectron2 and
Ultralytics export COCO), the mismatch is reported and categories are matched by name instead of
being silently scored as zero. Evaluation is pycocotools'
``COCOeval`` over the ground-truth images that were predicted; the others are listed. The
detections scored are those ``segpipe export`` would write at the same score threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from typing import Optional

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe import layout, ownership, schema, storage
from segpipe.categories import CategoryTable
from segpipe.config import ConfigError
from segpipe.export import (ExportCounts, ExportOptions, coco_result, iter_ok_rows,
                            read_image_table, select_detections)
from segpipe.layout import existing_predictions, read_run_settings

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
                    score_threshold: float, settings: schema.RunSettings) -> list[dict]:
    """COCO results for the matched images, with ground-truth image and category ids.

    The detections are those ``segpipe export`` would write at ``score_threshold``.
    """
    gt_by_pred = {p: g for g, p in images.pred_by_gt.items()}
    options = ExportOptions(score_threshold=score_threshold)
    results = []
    for row in iter_ok_rows(predictions_dir):
        gt_id = gt_by_pred.get(row["image_id"])
        if gt_id is None:
            continue
        for det in select_detections(row, options, settings, ExportCounts()):
            category = categories.to_gt.get(det["category_id"])
            if category is None:
                continue
            results.append({**coco_result(gt_id, det), "category_id": category})
    return results


def evaluate(gt: COCO, results: list[dict], image_ids: list[int], iou_type: str) -> tuple[dict, str]:
    """COCOeval's 12 numbers (as a dict) and its printed table."""
    if not results:
        return {name: 0.0 for name in STAT_NAMES}, "(no detections to evaluate)\n"
    detections = gt.loadRes(results)
    evaluator = COCOeval(gt, detections, iou_type)
    evaluator.params.imgIds = image_ids
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    return stats, "\n".join(l for l in table.getvalue().splitlines() if "Average" in l) + "\n"


def crowd_regions(gt_json: dict, as_objects: bool) -> Optional[str]:
    """What to tell a user about ``iscrowd=1`` ground truth (``None``: nothing to tell).

    COCOeval ignores crowd regions, so a ground truth whose annotations are all crowd (as
    datumaro's mask export writes them) scores every AP as -1. With ``as_objects`` they are
    turned into ordinary objects (in ``gt_json``)."""
    annotations = gt_json["annotations"]
    crowd = [a for a in annotations if a.get("iscrowd")]
    if not crowd:
        return None
    if as_objects:
        for a in crowd:
            a["iscrowd"] = 0
        return (f"{len(crowd)} ground-truth annotations marked iscrowd=1 were evaluated as "
                "ordinary objects (--crowd-as-objects)")
    if len(crowd) == len(annotations):
        return (f"all {len(crowd)} ground-truth annotations are iscrowd=1 (crowd regions; "
                "datumaro's mask export writes them so): COCOeval ignores crowd regions, so "
                "every AP is -1. If they are single objects, pass --crowd-as-objects")
    return None


EVAL_JSON = "eval.json"


def run_eval(output: str, gt_path: str, score_threshold: Optional[float] = None,
             iou_types: Optional[tuple[str, ...]] = None, crowd_as_objects: bool = False) -> dict:
    """Evaluate ``output/predictions`` against ``gt_path``; write and return ``output/eval.json``.

    ``iou_types`` defaults to segm and bbox (bbox alone for a box-only run; asking a box-only
    run for segm is a ``ConfigError``). ``crowd_as_objects`` evaluates ``iscrowd=1`` ground
    truth as ordinary objects.
    """
    predictions_dir = existing_predictions(output)
    settings = read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    layout.check_folder_target(output, "OUTPUT", " (eval writes eval.json into it)")
    ownership.check_replaceable(output, [EVAL_JSON])
    if iou_types is None:
        iou_types = IOU_TYPES if settings.model.has_masks else ("bbox",)
    if "segm" in iou_types and not settings.model.has_masks:
        raise ConfigError(f"--iou-type segm needs masks, but this run's detector "
                          f"({settings.model.arch}) finds boxes only; use --iou-type bbox")
    floor = settings.model.score_floor
    threshold = floor if score_threshold is None else score_threshold
    if threshold < floor:
        raise ConfigError(f"score threshold {threshold} is below the stored score floor {floor}")
    fs, gt_file = storage.resolve(gt_path)
    try:
        gt_json = json.loads(storage.read_bytes(fs, gt_file))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read ground truth {gt_path}: {exc}") from None
    if not isinstance(gt_json, dict) or not {"images", "annotations", "categories"} <= set(gt_json):
        raise ConfigError(f"{gt_path} is not a COCO instances file (images, annotations, categories)")
    crowd_message = crowd_regions(gt_json, crowd_as_objects)
    categories = match_categories(gt_json["categories"], settings.categories)
    images = match_images(gt_json["images"], predictions_dir)
    gt = COCO()
    gt.dataset = gt_json
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = collect_results(predictions_dir, images, categories, threshold, settings)
    report: dict = {}
    tables = {}
    image_ids = sorted(images.pred_by_gt)
    for iou_type in iou_types:
        report[iou_type], tables[iou_type] = evaluate(gt, results, image_ids, iou_type)
    report["matching"] = {
        "categories": categories.how, "category_message": categories.message,
        "crowd_message": crowd_message,
        "images_evaluated": len(image_ids), "ground_truth_images": len(gt_json["images"]),
        "not_predicted": images.not_predicted, "failed": images.failed,
        "size_mismatch": images.size_mismatch,
    }
    report["iou_types"] = list(iou_types)
    report["score_threshold"] = threshold
    report["detections"] = len(results)
    report["tables"] = tables
    ownership.write_json(output, EVAL_JSON, report)
    return report

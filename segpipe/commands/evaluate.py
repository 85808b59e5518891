"""``segpipe eval``: COCO AP of a run's predictions against a ground-truth file; writes ``eval.json``."""

from __future__ import annotations

import contextlib
import io
from typing import Optional

from pycocotools.coco import COCO

from segpipe.annotations.selection import ExportCounts
from segpipe.coco.evaluate import (
    IOU_TYPES,
    collect_results,
    crowd_regions,
    evaluate,
    match_categories,
    match_images,
    own_export,
)
from segpipe.coco.ground_truth import load_ground_truth
from segpipe.config import ConfigError
from segpipe.io import ownership
from segpipe.output import run_folder
from segpipe.output.run_folder import existing_predictions, read_run_settings

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
    run_folder.check_folder_target(output, "OUTPUT", " (eval writes eval.json into it)")
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
    # one file, or the shards that an index.json (or the folder holding it) lists, checked
    gt_json = load_ground_truth(gt_path)
    crowd_message = crowd_regions(gt_json, crowd_as_objects)
    categories = match_categories(gt_json["categories"], settings.categories)
    images = match_images(gt_json["images"], predictions_dir)
    gt = COCO()
    gt.dataset = gt_json
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    counts = ExportCounts()   # what predictions/ holds damaged: left out, named
    results = collect_results(predictions_dir, images, categories, threshold, settings, counts)
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
        "own_export_message": own_export(gt_json, settings),
        "damaged_detections": counts.damaged_left_out, "damaged": counts.damaged,
    }
    report["iou_types"] = list(iou_types)
    report["random_weights"] = settings.random_weights
    report["score_threshold"] = threshold
    report["detections"] = len(results)
    report["tables"] = tables
    ownership.write_json(output, EVAL_JSON, report)
    return report

"""Your own model: a fine-tuned checkpoint with its own classes, and box-only Faster R-CNN."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import small_config, small_spec
from images import write_photos
from parity import compare_with_torchvision
from segpipe.model.categories import CategoryError, parse_categories
from segpipe.commands.evaluate import run_eval
from segpipe.output.run_folder import predictions_dir, prediction_files, read_run_settings
from segpipe.model.build import build_model
from segpipe.commands.segment import run_segment
from segpipe.commands.render import RenderRequest, run_render
from test_cli import run_cli, small_flags

#: The user's classes, ids neither contiguous nor sorted: label k is the k-th entry.
CATEGORIES = [{"id": 7, "name": "cat", "supercategory": "animal"},
              {"id": 3, "name": "cup", "supercategory": "kitchen"},
              {"id": 42, "name": "rocket", "supercategory": "vehicle"}]


def rows_of(out) -> dict[str, dict]:
    rows = [r for p in prediction_files(str(out / "predictions")) for r in pq.read_table(p).to_pylist()]
    assert max(Counter(r["image_id"] for r in rows).values()) == 1
    return {r["file_name"]: r for r in rows}


def self_evaluate(out, iou_type: str) -> float:
    gt = COCO(str(out / "coco" / "instances.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(out / "coco" / "results.json")), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[0]


@pytest.fixture(scope="module")
def custom(tmp_path_factory, make_checkpoint, local_ray):
    """A 4-class Mask R-CNN checkpoint (background + 3) named by a COCO categories file."""
    root = tmp_path_factory.mktemp("custom")
    write_photos(root / "images")
    categories = root / "categories.json"
    categories.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    weights = make_checkpoint("maskrcnn_resnet50_fpn", 4)
    config = small_config(root / "images", root / "out", weights, categories=str(categories),
                          score_threshold=0.1)
    report = run_segment(config)
    return root, config, report, weights


def test_custom_classes_equal_torchvision_with_labels_mapped_through_the_file(custom):
    root, config, _, weights = custom
    model = build_model(small_spec(num_classes=4))
    model.load_state_dict(torch.load(weights, weights_only=True))
    rows = rows_of(root / "out")
    compared, exact = compare_with_torchvision(rows, root / "images", model, 0.5,
                                               category_of=lambda k: CATEGORIES[k - 1]["id"])
    assert compared >= 20
    names = {c["id"]: c["name"] for c in CATEGORIES}
    found = {d["category_id"] for r in rows.values() for d in r["detections"]}
    assert found <= set(names) and len(found) >= 2
    assert all(d["category_name"] == names[d["category_id"]]
               for r in rows.values() for d in r["detections"])


def test_every_output_carries_the_files_categories(custom):
    root, _, report, _ = custom
    out = root / "out"
    instances = json.loads((out / "coco" / "instances.json").read_text())
    assert instances["categories"] == CATEGORIES
    results = json.loads((out / "coco" / "results.json").read_text())
    assert instances["annotations"] and {a["category_id"] for a in results} <= {7, 3, 42}
    assert {a["category_id"] for a in instances["annotations"]} == {a["category_id"] for a in results}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["categories"] == CATEGORIES
    assert manifest["weights"]["num_classes"] == 4 and manifest["weights"]["warnings"] == []
    settings = read_run_settings(predictions_dir(str(out)))
    assert settings.categories.coco_json() == CATEGORIES and settings.model.num_classes == 4
    assert report.counts.unknown_category_left_out == 0
    assert self_evaluate(out, "segm") == pytest.approx(1.0)


def test_export_eval_and_render_use_the_recorded_table(custom, tmp_path):
    root, _, _, _ = custom
    out = root / "out"
    exported = run_cli("export", str(out), "--to", str(tmp_path / "x"), "--score-threshold",
                       "0.1", "--classes", "Rocket,7")
    assert exported.returncode == 0, exported.stderr
    data = json.loads((tmp_path / "x" / "instances.json").read_text())
    assert data["categories"] == CATEGORIES
    assert data["annotations"] and {a["category_id"] for a in data["annotations"]} <= {42, 7}
    unknown = run_cli("export", str(out), "--to", str(tmp_path / "y"), "--classes", "person")
    assert unknown.returncode == 2 and "this run's classes are cat, cup, rocket" in unknown.stderr

    # A ground truth numbering the same names 1, 2, 3: matched by name, AP 1.
    gt = json.loads((out / "coco" / "instances.json").read_text())
    renumber = {7: 1, 3: 2, 42: 3}
    for c in gt["categories"]:
        c["id"] = renumber[c["id"]]
    for a in gt["annotations"]:
        a["category_id"] = renumber[a.pop("category_id")]
        a.pop("score")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    report = run_eval(str(out), str(tmp_path / "gt.json"), score_threshold=0.1)
    assert report["matching"]["categories"] == "by name"
    assert report["segm"]["AP"] == pytest.approx(1.0)

    summary = run_render(RenderRequest(str(out), str(root / "images"), str(tmp_path / "g"),
                                       score_threshold=0.1, classes="cat,cup,rocket"))
    assert summary["rendered"] == 4 and not summary["errors"]
    page = (tmp_path / "g" / "index.html").read_text()
    assert any(f"<td>{c['name']}</td>" in page for c in CATEGORIES)


def test_categories_files_in_every_form_and_their_mistakes():
    assert [(c.id, c.name) for c in parse_categories("cat\n\ncup\nrocket\n", "t.txt")] == [
        (1, "cat"), (2, "cup"), (3, "rocket")]
    bare = parse_categories(json.dumps(CATEGORIES), "c.json")
    assert [(c.id, c.name, c.supercategory) for c in bare] == [
        (c["id"], c["name"], c["supercategory"]) for c in CATEGORIES]
    for text, message in [("{}", "without a 'categories' list"),
                          ('[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]', "id 1 is used twice"),
                          ('[{"id": "1", "name": "a"}]', "non-negative integer"),
                          ("a\nA\n", "appears twice"), ("\n\n", "names no category"),
                          ("[1,", "not valid JSON")]:
        with pytest.raises(CategoryError, match=message):
            parse_categories(text, "f")


def test_a_file_of_the_wrong_length_is_refused_before_anything_is_written(custom, tmp_path):
    root, _, _, weights = custom
    (tmp_path / "two.txt").write_text("cat\ncup\n")
    result = run_cli("segment", str(root / "images"), str(tmp_path / "out"), "--weights",
                     str(weights), "--categories", str(tmp_path / "two.txt"), *small_flags())
    assert result.returncode == 2
    assert "names 2 categories, but the model has 4 classes" in result.stderr
    assert not (tmp_path / "out").exists()
    missing = run_cli("segment", str(root / "images"), str(tmp_path / "out"), "--weights",
                      str(weights), "--categories", str(tmp_path / "nope.json"), *small_flags())
    assert missing.returncode == 2 and "categories file" in missing.stderr
    assert not (tmp_path / "out").exists()


def test_resume_with_another_category_table_is_refused(custom, tmp_path):
    root, _, _, weights = custom
    (tmp_path / "renamed.txt").write_text("kitten\nmug\nspaceship\n")
    files = sorted(prediction_files(str(root / "out" / "predictions")))
    result = run_cli("segment", str(root / "images"), str(root / "out"), "--weights",
                     str(weights), "--categories", str(tmp_path / "renamed.txt"), *small_flags(),
                     "--score-threshold", "0.1", "--resume")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot resume" in result.stderr and "categories: 3 file categories (cat, cup, rocket)" \
        in result.stderr
    assert sorted(prediction_files(str(root / "out" / "predictions"))) == files


# --- Box-only detectors ---

@pytest.fixture(scope="module")
def boxes(tmp_path_factory, make_checkpoint, local_ray):
    root = tmp_path_factory.mktemp("boxes")
    write_photos(root / "images", names=("astronaut", "coffee", "rocket"))
    weights = make_checkpoint("fasterrcnn_resnet50_fpn", 91)
    config = small_config(root / "images", root / "out", weights, arch="fasterrcnn_resnet50_fpn",
                          score_threshold=0.05)
    report = run_segment(config)
    return root, report, weights


def test_box_only_detections_equal_torchvision(boxes):
    root, report, weights = boxes
    model = build_model(small_spec(arch="fasterrcnn_resnet50_fpn"))
    model.load_state_dict(torch.load(weights, weights_only=True))
    rows = rows_of(root / "out")
    compared, _ = compare_with_torchvision(rows, root / "images", model, 0.5)
    assert compared >= 20
    assert all(d["soft_mask"] is None for r in rows.values() for d in r["detections"])


def test_box_only_coco_files_have_no_segmentation_and_box_areas(boxes):
    root, report, _ = boxes
    out = root / "out"
    instances = json.loads((out / "coco" / "instances.json").read_text())
    results = json.loads((out / "coco" / "results.json").read_text())
    assert instances["annotations"] and len(results) == len(instances["annotations"])
    for a in instances["annotations"]:
        assert "segmentation" not in a
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
    assert not any("segmentation" in r for r in results)
    assert self_evaluate(out, "bbox") == pytest.approx(1.0)
    assert report.counts.empty_masks_left_out == 0


def test_mask_operations_on_a_box_only_run_are_refused_and_boxes_are_drawn(boxes, tmp_path):
    root, _, _ = boxes
    out = root / "out"
    for args, flag in [(("export", str(out), "--to", str(tmp_path / "p"), "--polygons"), "--polygons"),
                       (("export", str(out), "--to", str(tmp_path / "p"), "--mask-threshold", "0.3"),
                        "--mask-threshold")]:
        refused = run_cli(*args)
        assert refused.returncode == 2 and f"{flag} needs masks" in refused.stderr
        assert not (tmp_path / "p").exists()
    gt = json.loads((out / "coco" / "instances.json").read_text())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    segm = run_cli("eval", str(out), "--gt", str(tmp_path / "gt.json"), "--iou-type", "segm")
    assert segm.returncode == 2 and "finds boxes only" in segm.stderr
    default = run_cli("eval", str(out), "--gt", str(tmp_path / "gt.json"))
    assert default.returncode == 0, default.stderr
    assert "segpipe eval: bbox" in default.stdout and "segpipe eval: segm" not in default.stdout
    assert json.loads((out / "eval.json").read_text())["bbox"]["AP"] == pytest.approx(1.0)

    summary = run_render(RenderRequest(str(out), str(root / "images"), str(tmp_path / "g"),
                                       score_threshold=0.05))
    assert summary["rendered"] == 3
    original = np.asarray(Image.open(root / "images" / "coffee.png").convert("RGB"), np.float32)
    drawn = np.asarray(Image.open(tmp_path / "g" / "images" / "coffee.jpg"), np.float32)
    det = max(rows_of(out)["coffee.png"]["detections"], key=lambda d: d["bbox"][2] * d["bbox"][3])
    assert det["bbox"][3] > 10
    x, y, w, h = (int(round(v)) for v in det["bbox"])
    left_edge = (slice(y + 2, y + h - 2), slice(max(x - 1, 0), x + 3))  # 2-px outline inside
    assert np.abs(drawn[left_edge] - original[left_edge]).mean() > 15

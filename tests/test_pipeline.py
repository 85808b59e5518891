"""One real pipeline run (local Ray, seeded checkpoint file): parity with torchvision, COCO validity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import small_config, small_spec
from images import photo, write_photos
from parity import compare_with_torchvision, get_prediction
from segpipe import schema
from segpipe.model.categories import COCO_TABLE
from segpipe.output.run_folder import prediction_files
from segpipe.model.build import build_model
from segpipe.commands.segment import run_segment

COCO_CATEGORY_IDS = COCO_TABLE.ids


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint, local_ray):
    """Six photos, two pairs of which share a padded shape (so they are batched together)."""
    root = tmp_path_factory.mktemp("parity")
    images = root / "images"
    write_photos(images)
    flipped = np.asarray(Image.open(images / "astronaut.png"))[:, ::-1]
    (images / "more").mkdir()
    Image.fromarray(np.ascontiguousarray(flipped)).save(images / "more" / "astronaut_flipped.png")
    shutil.copy(images / "chelsea.png", images / "more" / "chelsea copy.png")
    # the default pool: two one-thread actors on 2 CPUs for these two batches
    config = small_config(images, root / "out", checkpoint, actors="auto", torch_threads=0)
    report = run_segment(config)
    return config, report, images, root / "out"


def read_rows(out) -> list[dict]:
    """Every row of every prediction file, checked against the schema."""
    rows = []
    for path in prediction_files(str(out / "predictions")):
        table = pq.read_table(path)
        assert table.schema.equals(schema.PREDICTION_SCHEMA, check_metadata=False)
        rows += table.to_pylist()
    return rows


def read_predictions(out) -> dict[str, dict]:
    rows = read_rows(out)
    by_name = {r["file_name"]: r for r in rows}
    assert len(by_name) == len(rows), "an image has more than one row"
    return by_name


def test_every_image_once_and_all_ok(run):
    config, report, images, out = run
    rows = read_rows(out)
    names = [r["file_name"] for r in rows]
    assert sorted(names) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert len(set(r["image_id"] for r in rows)) == len(rows)
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert report.accounting.complete and report.accounting.written == len(rows)


def test_a_run_leaves_no_actor_of_its_own_on_the_ray_it_joined(run):
    """A Python user's session runs many segments on one Ray: each run's actors (its
    predictors, encoders and progress monitor) end with it. The monitor did not: Ray Data
    kept its handle, and each run left a process of ~800 MB behind."""
    import time

    import psutil

    def run_actors() -> list[str]:
        names = []
        for process in psutil.Process().children(recursive=True):   # this process's local Ray
            try:
                name = process.cmdline()[0] if process.cmdline() else ""
            except psutil.Error:
                continue
            if any(kind in name for kind in ("RunMonitor", "PredictStage", "MaskEncoder")):
                names.append(name)
        return names

    deadline = time.time() + 20
    while run_actors() and time.time() < deadline:
        time.sleep(0.2)
    assert not run_actors()


def test_detections_equal_direct_torchvision_calls(run, checkpoint):
    config, report, images, out = run
    model = build_model(small_spec())
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    compared, exact = compare_with_torchvision(read_predictions(out), images, model,
                                               config.mask_threshold)
    assert compared >= 30
    print(f"parity: {compared} detections compared, {exact} masks pixel-identical")


def test_results_score_ap_1_against_torchvisions_own_predictions(run, checkpoint):
    """Ground truth made from direct torchvision calls (masks encoded by pycocotools):
    segpipe's results.json must match it exactly, or AP drops below 1."""
    config, report, images, out = run
    model = build_model(small_spec())
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    instances = json.loads((out / "coco" / "instances.json").read_text())
    gt = {"images": instances["images"], "categories": instances["categories"], "annotations": []}
    for image in instances["images"]:
        ref = get_prediction(model, images / image["file_name"], config.mask_threshold)
        for label, score, box, mask in zip(ref["labels"], ref["scores"], ref["boxes"], ref["masks"]):
            if score < config.score_threshold or label not in COCO_CATEGORY_IDS or not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image["id"], "category_id": int(label),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})
    assert len(gt["annotations"]) == report.counts.annotations > 0
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert {c["id"] for c in coco.loadCats(coco.getCatIds())} == COCO_CATEGORY_IDS
    results = coco.loadRes(str(out / "coco" / "results.json"))
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(coco, results, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type


def test_coco_annotations_are_consistent_with_predictions(run):
    config, report, images, out = run
    rows = {r["image_id"]: r for r in read_predictions(out).values()}
    instances = json.loads((out / "coco" / "instances.json").read_text())
    assert {i["id"]: i["file_name"] for i in instances["images"]} == {
        k: r["file_name"] for k, r in rows.items()}
    sizes = {i["id"]: (i["height"], i["width"]) for i in instances["images"]}
    kept = [d for r in rows.values() for d in r["detections"]
            if d["score"] >= config.score_threshold and d["area"] > 0
            and d["category_id"] in COCO_CATEGORY_IDS]
    assert len(instances["annotations"]) == len(kept)
    assert len({a["id"] for a in instances["annotations"]}) == len(kept)
    for a in instances["annotations"]:
        assert a["iscrowd"] == 0 and a["score"] >= config.score_threshold
        assert a["category_id"] in COCO_CATEGORY_IDS
        decoded = mask_utils.decode(a["segmentation"])
        assert decoded.shape == sizes[a["image_id"]]
        assert decoded.sum() == a["area"] > 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["counts"]["detections"] == sum(len(r["detections"]) for r in rows.values())
    assert manifest["weights"]["kind"] == "file"
    assert {"torch", "torchvision", "ray", "pycocotools", "pyarrow"} <= set(manifest["versions"])
    assert manifest["images_per_s"]["pipeline"] > 0
    assert manifest["config"]["mask_threshold"] == config.mask_threshold
    predictors = manifest["cluster"]["predictors"]   # the device each actor really used
    assert predictors and {p["device"] for p in predictors} == {"cpu"}
    assert {p["precision"] for p in predictors} == {config.precision}
    assert sum(p["actors_started"] for p in predictors) >= 1


def test_a_tiled_run_keeps_one_row_per_image_and_re_exports_from_its_parts(tmp_path, checkpoint,
                                                                          local_ray):
    """--tile through the whole pipeline: an image larger than a tile (tiled, with the full
    pass), one that fits a tile (whole), one that does not decode; one row each. The tiled
    image's detections keep their parts, and re-pasting them gives back the stored masks."""
    from segpipe.encode.encoder import rethreshold
    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import run_export

    images = tmp_path / "images"
    write_photos(images, ("chelsea",), scale=0.3)      # 135×90: fits one tile
    big = np.concatenate([photo("astronaut", 0.5), photo("coffee", 0.7)[:256, :256]], axis=1)
    Image.fromarray(big).save(images / "wide.png")      # 512×256: 6 tiles of 160
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    config = small_config(images, out, checkpoint, tile=160, tile_full_pass=True,
                          soft_mask_dtype="float32")
    report = run_segment(config)
    rows = read_predictions(out)
    assert sorted(rows) == ["broken.png", "chelsea.png", "wide.png"]
    assert report.accounting.complete
    assert rows["broken.png"]["status"] == "error"
    wide, small = rows["wide.png"], rows["chelsea.png"]
    assert small["status"] == "ok" and all(d["parts"] is None for d in small["detections"])
    assert wide["status"] == "ok" and wide["width"] == big.shape[1]
    tiled = [d for d in wide["detections"] if d["parts"]]
    assert tiled and len(tiled) == len(wide["detections"])
    assert any(len(d["parts"]) > 1 for d in tiled), "nothing merged across tiles"
    windows = {tuple(p["window"]) for d in tiled for p in d["parts"]}
    assert (0, 0, big.shape[1], big.shape[0]) in windows      # the full pass took part
    for d in tiled:
        assert d["soft_mask"] is None
        x0 = min(p["window"][0] + p["box"][0] for p in d["parts"])
        assert d["box"][0] == pytest.approx(x0, abs=1e-3)
    again = rethreshold(wide["detections"], wide["height"], wide["width"], 0.5, "float32")
    assert [rle for _, rle in again] == [d["segmentation"] for d in wide["detections"]]
    assert [area for area, _ in again] == [d["area"] for d in wide["detections"]]
    run_export(str(out), str(tmp_path / "x03"), ExportOptions(score_threshold=0.5,
                                                             mask_threshold=0.3))
    results = json.loads((tmp_path / "x03" / "results.json").read_text())
    assert any(r["image_id"] == wide["image_id"] for r in results)

"""Hugging Face transformers behind the model seam: Mask2Former's instance masks and DETR's
boxes are those of the image processor's own post-processing (scores within 1e-4, boxes within
0.5 px, mask IoU >= 0.99) on seeded random models saved here with ``save_pretrained``; the
masks re-export at another threshold as a fresh run makes them; nothing but safetensors loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config
from family_checkpoints import detr_folder, mask2former_folder
from images import photo, write_photos
from parity import decoded, mask_iou, precision_agreement

import segpipe
from segpipe.config import ConfigError
from segpipe.encode.encoder import encode_detections
from segpipe.model.resolved import resolve_weights
from segpipe.model.spec import ModelSpec
from segpipe.output.run_folder import prediction_files

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SCORE_FLOOR = 0.1


def hf_spec(**changes) -> ModelSpec:
    values = {**dict(arch="transformers", min_size=800, max_size=1333, score_floor=SCORE_FLOOR,
                     nms_threshold=0.5, detections_per_image=100, proposals_per_image=1000), **changes}
    return ModelSpec(**values)


def processor_instances(folder: Path, image: np.ndarray) -> list[dict]:
    """``post_process_instance_segmentation`` of one image: score, label and mask, best first."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    model = AutoModelForUniversalSegmentation.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=[np.array(image)], return_tensors="pt"))
    found = processor.post_process_instance_segmentation(
        outputs, threshold=SCORE_FLOOR, target_sizes=[image.shape[:2]], return_binary_maps=True)[0]
    out = [{"score": s["score"], "label": s["label_id"], "mask": found["segmentation"][n].numpy() > 0}
           for n, s in enumerate(found["segments_info"])]
    return sorted(out, key=lambda d: -d["score"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"mask2former": mask2former_folder(root / "m2f"), "detr": detr_folder(root / "detr")}


@pytest.fixture(scope="module")
def mask2former_run(tmp_path_factory, folders, local_ray):
    root = tmp_path_factory.mktemp("m2f-run")
    write_photos(root / "photos", names=PHOTOS)
    torch.set_num_threads(2)
    segpipe.run_segment(small_config(root / "photos", root / "out", folders["mask2former"],
                                     arch="transformers", score_floor=SCORE_FLOOR, batch_size=2,
                                     detections_per_image=100, torch_threads=2))
    rows = {r["file_name"]: r for p in prediction_files(str(root / "out" / "predictions"))
            for r in pq.read_table(p).to_pylist()}
    return root, rows


def test_a_mask2former_run_gives_the_processors_instances(mask2former_run, folders):
    torch.set_num_threads(2)
    _, rows = mask2former_run
    worst = {"score": 0.0, "iou": 1.0}
    compared = 0
    for name in PHOTOS:
        row = rows[f"{name}.png"]
        assert row["status"] == "ok"
        theirs = processor_instances(folders["mask2former"], photo(name))
        ours = row["detections"]
        assert len(ours) == len(theirs) > 0
        for det, ref in zip(ours, theirs):
            worst["score"] = max(worst["score"], abs(det["score"] - ref["score"]))
            assert det["category_name"] == ("cat", "dog", "car")[ref["label"]]
            mask = decoded(det["segmentation"])
            worst["iou"] = min(worst["iou"], mask_iou(mask, ref["mask"]))
            ys, xs = np.nonzero(mask)   # the box is the mask's tight box
            assert det["box"] == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1)
            compared += 1
    assert compared >= 20, compared
    assert worst["score"] <= 1e-4 and worst["iou"] >= 0.99, worst


def test_re_export_of_mask2former_masks_is_a_fresh_run_at_the_threshold(mask2former_run, folders,
                                                                        tmp_path):
    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import run_export
    from segpipe.model import huggingface

    root, _ = mask2former_run
    run_export(str(root / "out"), str(tmp_path / "coco"), ExportOptions(SCORE_FLOOR, mask_threshold=0.3),
               shard_images=0)
    results = json.loads((tmp_path / "coco" / "results.json").read_text())
    images = {im["id"]: im["file_name"] for im in json.loads(
        (tmp_path / "coco" / "instances.json").read_text())["images"]}
    weights = resolve_weights(str(folders["mask2former"]), hf_spec())
    detector = huggingface.Detector(weights.spec, weights.payload, torch.device("cpu"))
    worst, grown = 1.0, 0
    for name in PHOTOS:
        image = photo(name)
        found = detector.predict([image], [True])[0]
        fresh = encode_detections(found, *image.shape[:2], 0.3, mask_frame="mask2former")
        at_half = encode_detections(found, *image.shape[:2], 0.5, mask_frame="mask2former")
        got = sorted((r for r in results if images[r["image_id"]] == f"{name}.png"), key=lambda r: -r["score"])
        assert len(got) == len(fresh) > 0
        for a, b, c in zip(got, fresh, at_half):
            worst = min(worst, mask_iou(decoded(a["segmentation"]), decoded(b["segmentation"])))
            grown += int(decoded(a["segmentation"]).sum() > decoded(c["segmentation"]).sum())
    assert worst >= 0.99 and grown > 0, (worst, grown)


def test_detr_boxes_are_the_processors_and_run_in_bf16(folders):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from segpipe.model import huggingface

    torch.set_num_threads(2)
    weights = resolve_weights(str(folders["detr"]), hf_spec())
    assert not weights.spec.has_masks and weights.categories.describe().startswith("4 model")
    images = [photo(name) for name in PHOTOS]
    ours = huggingface.Detector(weights.spec, weights.payload, torch.device("cpu")).predict(images, [True] * 4)
    low = huggingface.Detector(weights.spec, weights.payload, torch.device("cpu"), "bf16").predict(images, [True] * 4)
    model = AutoModelForObjectDetection.from_pretrained(folders["detr"]).eval()
    processor = AutoImageProcessor.from_pretrained(folders["detr"])
    found = 0
    for image, mine, bf16 in zip(images, ours, low):
        with torch.no_grad():
            outputs = model(**processor(images=[np.array(image)], return_tensors="pt"))
        theirs = processor.post_process_object_detection(outputs, threshold=SCORE_FLOOR,
                                                         target_sizes=[image.shape[:2]])[0]
        order = torch.argsort(theirs["scores"], descending=True, stable=True)
        assert len(mine.scores) == len(order) > 0
        assert np.abs(mine.scores - theirs["scores"][order].numpy()).max() <= 1e-4
        assert np.abs(mine.boxes - theirs["boxes"][order].numpy()).max() <= 0.5
        assert np.array_equal(mine.labels - 1, theirs["labels"][order].numpy())
        assert len(bf16.scores) and np.abs(bf16.boxes[:, None] - mine.boxes[None]).max(2).min(1).max() <= 8
        found += len(mine.scores)
    assert found > 20


@pytest.mark.parametrize("family", ["detr", "mask2former"])
def test_fp16_autocast_finds_fp32s_detections(folders, monkeypatch, family):
    """fp16 is autocast to float16 around the model, its outputs made float32 for the
    post-processing. segpipe's guard allows it on CUDA only; here it is lifted so that CPU's
    fp16 kernels run the same code. Random weights: every box is found again (IoU >= 0.99);
    Mask2Former's random mask logits sit near zero, where many of a mask's pixels flip."""
    from segpipe.model import huggingface

    def cpu_fp16(device, precision):
        assert precision == "fp16"
        return torch.autocast("cpu", dtype=torch.float16)

    torch.set_num_threads(2)
    weights = resolve_weights(str(folders[family]), hf_spec())
    images = [photo(name) for name in PHOTOS]
    fp32 = huggingface.Detector(weights.spec, weights.payload, torch.device("cpu")).predict(images, [True] * 4)
    monkeypatch.setattr(huggingface, "autocast", cpu_fp16)
    half = huggingface.Detector(weights.spec, weights.payload, torch.device("cpu"), "fp16")
    seen: list = []   # the dtypes the model's linear layers gave
    for layer in (m for m in half.model.modules() if isinstance(m, torch.nn.Linear)):
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    fp16 = half.predict(images, [True] * 4)
    assert seen and set(seen) == {torch.float16}   # the model ran in half precision
    assert all(d.scores.dtype == d.boxes.dtype == np.float32 for d in fp16)
    assert [len(d.scores) for d in fp16] == [len(d.scores) for d in fp32]
    mask_frame = weights.spec.mask_frame if weights.spec.has_masks else None
    box_ious, mask_ious = precision_agreement(fp32, fp16, images, mask_frame)
    print(f"{family}: box IoU min {min(box_ious):.3f}; mask IoU median "
          f"{np.median(mask_ious) if mask_ious else float('nan'):.3f}")   # docs/exactness.md
    assert len(box_ious) >= 10 and min(box_ious) >= 0.99, box_ious
    if weights.spec.has_masks:
        assert len(mask_ious) == len(box_ious) and np.median(mask_ious) >= 0.6, mask_ious


def test_a_detr_run_tiles_and_exports_in_every_format(folders, tmp_path, local_ray):
    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import ExportFormat, run_export

    write_photos(tmp_path / "photos", names=PHOTOS[:2])
    segpipe.run_segment(small_config(tmp_path / "photos", tmp_path / "out", folders["detr"],
                                     arch="transformers", score_floor=SCORE_FLOOR, tile=256,
                                     torch_threads=2))
    rows = [r for p in prediction_files(str(tmp_path / "out" / "predictions"))
            for r in pq.read_table(p).to_pylist()]
    assert {r["status"] for r in rows} == {"ok"} and all(r["detections"] for r in rows)
    kept = sum(1 for r in rows for d in r["detections"] if d["score"] >= 0.5)
    for fmt in (None, ExportFormat("yolo"), ExportFormat("label-studio", "/images/")):
        target = tmp_path / f"export-{fmt.name if fmt else 'coco'}"
        summary = run_export(str(tmp_path / "out"), str(target), ExportOptions(0.5), shard_images=0,
                             export_format=fmt)
        assert summary["counts"]["annotations"] == kept > 0


def test_only_safetensors_of_built_in_models_load_and_mistakes_are_one_line(folders, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_bytes((folders["detr"] / name).read_bytes())
    torch.save({}, pickled / "pytorch_model.bin")
    remote = tmp_path / "remote"
    remote.mkdir()
    for path in folders["detr"].iterdir():
        (remote / path.name).write_bytes(path.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Model"}}))
    for folder, words in ((pickled, "safetensors only"), (remote, "need code of their own"),
                          (folders["detr"] / "config.json", "takes --weights DIR"),
                          ("random", "takes --weights DIR")):
        with pytest.raises(ConfigError, match=words) as refused:
            resolve_weights(str(folder), hf_spec())
        assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="--tile cannot slice the masks"):
        resolve_weights(str(folders["mask2former"]), hf_spec(), tiled=True)

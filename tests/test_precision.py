"""Low precision that keeps boxes and masks right, measured stage by stage against fp32.

Random weights give near-tie scores, so any precision change reorders their detections: each
stage is fed the same inputs in both precisions (the same anchors, proposals and boxes), as
``bench.precision_stages.stage_agreement`` does. The photo is resized to 480×720 so that box
coordinates pass 512 px, where bf16 steps are 4 px: a decode left in bf16 shows there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import small_config
from images import photo
from segpipe.config import ConfigError, validate
from segpipe.model.spec import ModelSpec
from segpipe.model.build import build_model
from segpipe.cluster.shape import ClusterShape
from segpipe.cluster.plan import plan_stages
from segpipe.model.precision import autocast, install_fp32_islands, prepare_model
from bench.precision_stages import scale_to_trained_outputs, stage_agreement
from segpipe.model.inference import predict_images

pytestmark = pytest.mark.slow   # model forwards at 480×720 in fp32 and bf16: minutes on 2 cores


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def model_and_image():
    spec = ModelSpec("maskrcnn_resnet50_fpn", 480, 800, 0.05, 0.5, 100, 1000)
    torch.manual_seed(0)
    model = build_model(spec)
    spreads = scale_to_trained_outputs(model, as_tensor(photo("astronaut", 1.0)))
    assert spreads["box"] > 2 and spreads["rpn"] > 1   # random weights' spread, scaled to 1
    return model, as_tensor(photo("coffee", 1.0))


@pytest.fixture(scope="module")
def agreements(model_and_image):
    model, image = model_and_image
    return {islands: stage_agreement(model, image, "bf16", fp32_islands=islands)
            for islands in (True, False)}


def test_bf16_boxes_for_the_same_proposals_stay_within_half_a_pixel_of_fp32(agreements):
    ours = agreements[True]
    print(ours.as_dict())
    assert ours.anchors_max_px == 0.0
    assert ours.boxes_median_px <= 0.5 and ours.boxes_max_px <= 2.0
    assert ours.proposals_median_px <= 1.0
    assert all(error < 0.05 for error in ours.feature_relative_error.values())


def test_without_fp32_islands_torchvision_decodes_on_the_bf16_grid(agreements):
    """The same measurement fails for torchvision as it is: the test can tell."""
    theirs, ours = agreements[False], agreements[True]
    print(theirs.as_dict())
    assert theirs.anchors_max_px >= 1.0
    assert theirs.boxes_max_px > 2.0 and theirs.boxes_median_px > 3 * ours.boxes_median_px


def test_bf16_masks_for_the_same_boxes_overlap_fp32s(agreements):
    # Random mask heads draw pixel noise, all boundary: a trained model's blobs agree more.
    ours = agreements[True]
    assert ours.detections > 10
    assert ours.masks_mean_iou >= 0.95 and ours.mask_prob_max_diff < 0.1


def test_bf16_prediction_keeps_fp32_boxes_anchors_and_masks(model_and_image):
    model, image = model_and_image
    prepare_model(model, torch.device("cpu"), "bf16")
    try:
        det = predict_images(model, [image], "bf16")[0]
        assert det.boxes.dtype == np.float32 and det.soft_masks.dtype == np.float32
        assert len(det.scores) > 0 and np.all(det.scores[:-1] >= det.scores[1:])
        assert all(a.dtype == torch.float32 for a in model.rpn.anchor_generator.cell_anchors)
        assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        model.backbone.to(memory_format=torch.contiguous_format)


def test_fp32_islands_change_nothing_in_fp32(model_and_image):
    model, image = model_and_image
    install_fp32_islands(model)
    with torch.inference_mode():
        expected = model([image])[0]
    det = predict_images(model, [image], "fp32")[0]
    assert np.array_equal(det.boxes, expected["boxes"].numpy())
    assert np.array_equal(det.scores, expected["scores"].numpy())


def test_fp16_is_refused_off_gpus_before_any_work(tmp_path):
    config = small_config(tmp_path, tmp_path / "out", "random", precision="fp16", num_gpus=0)
    with pytest.raises(ConfigError, match="fp16 runs on CUDA GPUs only"):
        validate(config)
    auto = small_config(tmp_path, tmp_path / "out", "random", precision="fp16")
    with pytest.raises(ConfigError, match="use --precision bf16"):
        plan_stages(auto, ClusterShape.of({"CPU": 2.0, "memory": 8 * 2**30}))
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        autocast(torch.device("cpu"), "fp16")
    assert plan_stages(auto.replace(precision="bf16"),
                       ClusterShape.of({"CPU": 2.0, "memory": 8 * 2**30}))


def test_gpu_smoke_runs_on_cpu_at_a_tiny_size(tmp_path):
    """The one command for a GPU machine's first minutes also runs here, end to end."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "gpu_smoke.py"
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--width", "120", "--height", "90",
         "--min-size", "96", "--max-size", "160", "--images", "2", "--batch-sizes", "1,2",
         "--agreement-images", "1", "--threads", "1,2", "--proposals", "100",
         "--detections", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["cuda_available"] is False
    agreement = {a["fp32_islands"]: a for a in report["agreement"]}
    assert agreement[True]["anchors_max_px"] == 0.0
    speeds = [(r["precision"], r["batch"]) for r in report["speed"] if "images" not in r]
    assert {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)} <= set(speeds)
    assert all(r["images_per_s"] > 0 and r["detections_per_image"] > 0 for r in report["speed"])
    assert report["oom_recovery"] == {"skipped": "needs CUDA"}

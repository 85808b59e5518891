"""Where a predictor batch spends its time on a GPU: stage times and torch.profiler's top ops.

    python bench/gpu_profile.py [--batch 16] [--precision fp16] [--width 1333 --height 800]

Stage times are wall-clock with a device synchronisation after each stage (so they add up
to more than an unsynchronised batch takes): upload + normalise + resize + pad, backbone,
RPN, box head (with its post-processing), mask head, and the one device-to-host copy.
Needs what ``bench/gpu_smoke.py`` needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402

from bench.gpu_smoke import model_for, photos  # noqa: E402
from segpipe.model.spec import ModelSpec
from segpipe.model.resolved import resolve_weights
from segpipe.model.precision import autocast, uses_channels_last
from segpipe.model.inference import (
    canvas_shape,
    detections_to_host,
    image_tensor,
    pad_batch,
    predict_images,
)


def stage_times(model, arrays, precision: str, device: torch.device) -> dict[str, float]:
    times: dict[str, float] = {}

    def mark(name: str, start: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name] = round(1000 * (now - start), 2)
        return now

    heads = model.roi_heads
    with torch.inference_mode():
        t = time.perf_counter()
        images = [image_tensor(a, device) for a in arrays]
        prepared = [model.transform.resize(model.transform.normalize(i), None)[0] for i in images]
        shape = canvas_shape(*prepared[0].shape[-2:], model, "fixed")
        sizes = [tuple(p.shape[-2:]) for p in prepared]
        image_list = ImageList(pad_batch(prepared, shape), sizes)
        tensors = image_list.tensors
        if uses_channels_last(device, precision):
            tensors = tensors.contiguous(memory_format=torch.channels_last)
        t = mark("prepare_ms", t)
        with autocast(device, precision):
            features = model.backbone(tensors)
            t = mark("backbone_ms", t)
            proposals, _ = model.rpn(image_list, features)
            t = mark("rpn_ms", t)
            box_features = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
            logits, regression = heads.box_predictor(box_features)
            boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals,
                                                                 sizes)
            t = mark("box_head_ms", t)
            mask_logits = heads.mask_predictor(heads.mask_head(
                heads.mask_roi_pool(features, boxes, sizes)))
            t = mark("mask_head_ms", t)
        detections = [{"boxes": b, "scores": s, "labels": l, "masks": m[:, None]}
                      for b, s, l, m in zip(boxes, scores, labels,
                                            mask_logits.split([len(b) for b in boxes]))]
        detections_to_host(detections)
        mark("download_ms", t)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--json", default="gpu_profile.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = ModelSpec("maskrcnn_resnet50_fpn", 800, 1333, 0.05, 0.5, 100, 1000)
    model = model_for(spec, resolve_weights("random", spec, seed=0).payload, device,
                      args.precision)
    arrays = photos(args.batch, args.width, args.height)
    for _ in range(2):
        stage_times(model, arrays, args.precision, device)
    times = [stage_times(model, arrays, args.precision, device) for _ in range(3)]
    report = {"batch": args.batch, "precision": args.precision,
              "stage_ms": {k: min(t[k] for t in times) for k in times[0]}}
    print(json.dumps(report), flush=True)
    from torch.profiler import ProfilerActivity, profile

    tensors = [image_tensor(a, device) for a in arrays]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        predict_images(model, tensors, args.precision, "fixed")
        if device.type == "cuda":
            torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total")[:2 if device.type == "cuda" else 1]:
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
        print(table, flush=True)
        report[key] = table
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

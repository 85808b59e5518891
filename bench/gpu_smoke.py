"""The first ten minutes on a GPU machine, in one command; runs on CPU too (tests run it tiny).

    python bench/gpu_smoke.py [--device cuda] [--width 1333 --height 800] [--min-size 800]
        [--precisions fp32,bf16,fp16] [--batch-sizes 1,4,8,16] [--images 32] [--json PATH]

Needs torch, torchvision, numpy, pyarrow and scikit-image only (no Ray, no pycocotools): what a
bare GPU machine has. Seeded random weights, v1 Mask R-CNN. Writes one JSON (``--json``, and a
summary on stdout) with:

* ``environment``: torch, CUDA, cuDNN, driver, the device, CUDA_VISIBLE_DEVICES;
* ``agreement``: each low precision against fp32, stage by stage (``precision.stage_agreement``:
  the same anchors, proposals and boxes in both), with and without the fp32 islands;
* ``speed``: predictor images/s (host pixels to host detections: upload, resize, network,
  one packed download; no JPEG decode, no encode) per precision and batch size, with
  detections per image and peak device memory; channels_last against the default layout for
  the low precisions; ``canvas`` fixed against exact on mixed landscape/portrait sizes;
* ``host_syncs_per_image``: synchronising calls counted by ``torch.cuda.set_sync_debug_mode``;
* ``oom_recovery``: a device-memory cap that fits a few images but not the batch; the
  predictor actor splits the batch and every image still comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from segpipe.model.spec import ModelSpec
from segpipe.model.build import build_model
from segpipe.model.resolved import resolve_weights
from segpipe.model.precision import prepare_model, remove_fp32_islands
from bench.precision_stages import scale_to_trained_outputs, stage_agreement, summarise
from segpipe.model.devices import cuda_facts
from segpipe.model import batched_postprocess
from segpipe.model.inference import image_tensor, predict_images


def photos(count: int, width: int, height: int, mixed: bool = False) -> list[np.ndarray]:
    """``count`` distinct ``height×width`` crops of scikit-image's photos; ``mixed``: every
    third one portrait and every third one square-ish, as a mixed dataset has."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.stereo_motorcycle()[0]]
    out = []
    for i in range(count):
        w, h = width, height
        if mixed and i % 3 == 1:
            w, h = height, width
        elif mixed and i % 3 == 2:
            w = h = min(width, height)
        base = Image.fromarray(sources[i % len(sources)])
        scale = max(w / base.width, h / base.height) * (1 + 0.1 * (i % 4))
        big = np.asarray(base.resize((int(base.width * scale) + 1, int(base.height * scale) + 1)))
        x, y = (i * 37) % (big.shape[1] - w + 1), (i * 23) % (big.shape[0] - h + 1)
        crop = big[y:y + h, x:x + w]
        out.append(np.ascontiguousarray(crop[:, ::-1] if i % 2 else crop))
    return out


def environment(device: torch.device) -> dict:
    facts = {"python": platform.python_version(), "torchvision": torchvision.__version__,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
             else None, "cpu_count": os.cpu_count(), **cuda_facts()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count)
    return facts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_for(spec: ModelSpec, state_dict: dict, device: torch.device, precision: str,
              channels_last: bool = True, postprocess: str = "batched") -> torch.nn.Module:
    """The predictor's model; ``postprocess``: ``batched`` (``model.batched_postprocess``, what
    segpipe's predictor runs on GPUs) or ``per-image`` (torchvision's own)."""
    model = build_model(spec)
    model.load_state_dict(state_dict)
    prepare_model(model, device, precision)
    if postprocess == "batched":
        batched_postprocess.install(model)
    if not channels_last:
        model.backbone.to(memory_format=torch.contiguous_format)
    return model


def time_predictor(model, arrays: list[np.ndarray], batch: int, precision: str,
                   device: torch.device, canvas: str = "exact", repeats: int = 2,
                   channels_last: bool = True) -> dict:
    """Images/s of upload + ``predict_images`` over ``arrays`` in batches of ``batch``
    (best of ``repeats`` passes after one warm-up batch)."""
    import segpipe.model.precision as precision_module

    original = precision_module.uses_channels_last
    if not channels_last:
        precision_module.uses_channels_last = lambda device, precision: False
        model.backbone.to(memory_format=torch.contiguous_format)
    try:
        batches = [arrays[i:i + batch] for i in range(0, len(arrays), batch)]
        predict_images(model, [image_tensor(a, device) for a in batches[0]], precision, canvas)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best, detections = float("inf"), 0
        for _ in range(repeats):
            start = time.perf_counter()
            detections = 0
            for b in batches:
                dets = predict_images(model, [image_tensor(a, device) for a in b], precision,
                                      canvas)
                detections += sum(len(d.scores) for d in dets)
            sync(device)
            best = min(best, time.perf_counter() - start)
    finally:
        precision_module.uses_channels_last = original
        if original(device, precision):
            model.backbone.to(memory_format=torch.channels_last)
    result = {"batch": batch, "precision": precision, "canvas": canvas,
              "channels_last": channels_last and precision != "fp32",
              "images_per_s": round(len(arrays) / best, 2),
              "detections_per_image": round(detections / len(arrays), 1)}
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def time_concurrent(model, arrays: list[np.ndarray], batch: int, precision: str,
                    device: torch.device, threads: int) -> dict:
    """Images/s with ``threads`` threads each predicting its share of the batches on its own
    CUDA stream (what an actor running ``threads`` calls at once would do): one thread's
    host-side work and synchronisations overlap another's kernels."""
    import threading

    batches = [arrays[i:i + batch] for i in range(0, len(arrays), batch)]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None
               for _ in range(threads)]
    detections = [0] * threads

    def work(k: int) -> None:
        context = torch.cuda.stream(streams[k]) if streams[k] is not None else nullcontext()
        with context:
            for b in batches[k::threads]:
                dets = predict_images(model, [image_tensor(a, device) for a in b], precision)
                detections[k] += sum(len(d.scores) for d in dets)
            if streams[k] is not None:
                streams[k].synchronize()

    work_all = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    predict_images(model, [image_tensor(a, device) for a in batches[0]], precision)
    sync(device)
    start = time.perf_counter()
    for t in work_all:
        t.start()
    for t in work_all:
        t.join()
    sync(device)
    seconds = time.perf_counter() - start
    return {"batch": batch, "precision": precision, "threads": threads,
            "images_per_s": round(len(arrays) / seconds, 2),
            "detections_per_image": round(sum(detections) / len(arrays), 1)}


def group_sizes(model, arrays: list[np.ndarray], batch: int, canvas: str) -> list[int]:
    """The sizes of the network batches ``predict_images`` makes of each ``batch`` of images."""
    from collections import Counter

    from segpipe.model.inference import canvas_shape

    sizes = []
    for start in range(0, len(arrays), batch):
        shapes = Counter()
        for a in arrays[start:start + batch]:
            resized = model.transform.resize(torch.zeros(3, *a.shape[:2]), None)[0]
            shapes[canvas_shape(*resized.shape[-2:], model, canvas)] += 1
        sizes += sorted(shapes.values(), reverse=True)
    return sizes


def count_host_syncs(model, arrays: list[np.ndarray], precision: str,
                     device: torch.device) -> dict:
    """Synchronising calls in one batch, from ``torch.cuda.set_sync_debug_mode("warn")``."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    tensors = [image_tensor(a, device) for a in arrays]
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            predict_images(model, tensors, precision)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchronizing" in str(w.message).lower()]
    kinds: dict[str, int] = {}
    for s in syncs:
        kinds[s[:80]] = kinds.get(s[:80], 0) + 1
    return {"batch": len(arrays), "syncs": len(syncs),
            "per_image": round(len(syncs) / len(arrays), 2), "kinds": kinds}


def oom_recovery(spec: ModelSpec, state_dict: dict, arrays: list[np.ndarray],
                 device: torch.device, precision: str) -> dict:
    """Cap device memory between one image's need and the batch's; every image must come out."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    import pyarrow as pa

    from segpipe import schema
    from segpipe.model.stage import PredictStage

    actor = PredictStage(spec, state_dict, use_gpu=True, precision=precision,
                              canvas="fixed")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    predict_images(actor.detector.model, [image_tensor(arrays[0], device)], precision, "fixed")
    one = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(device).total_memory
    cap = base + 2.5 * one
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    rows = pa.Table.from_pylist([
        {"image_id": i, "file_name": f"{i}.jpg", "width": a.shape[1], "height": a.shape[0],
         "status": "ok", "error": None, schema.PIXELS: a.tobytes()}
        for i, a in enumerate(arrays)])
    start = time.perf_counter()
    try:
        out = actor(rows).to_pylist()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    statuses = [r["status"] for r in out]
    return {"batch": len(arrays), "cap_mb": round(cap / 2**20), "one_image_mb": round(one / 2**20),
            "ok": statuses.count("ok"), "errors": [r["error"] for r in out if r["error"]][:3],
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--proposals", type=int, default=1000,
                        help="RPN proposals kept per image (torchvision's default: 1000)")
    parser.add_argument("--detections", type=int, default=100,
                        help="most detections per image (torchvision's default: 100)")
    parser.add_argument("--precisions", default=None,
                        help="default: fp32,bf16,fp16 on CUDA, fp32,bf16 on CPU")
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--agreement-images", type=int, default=2)
    parser.add_argument("--json", default="gpu_smoke.json")
    parser.add_argument("--only", choices=("speed",), help="skip agreement and OOM recovery")
    parser.add_argument("--threads", default="1,2,3",
                        help="predictor threads (each on its own CUDA stream) to time for the "
                             "last precision, at every batch size with --thread-sweep, else "
                             "at the largest")
    parser.add_argument("--thread-sweep", action="store_true",
                        help="time every --threads count at every --batch-sizes entry")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN pick convolution algorithms by timing them "
                             "(torch.backends.cudnn.benchmark)")
    parser.add_argument("--postprocess", choices=("batched", "per-image", "both"),
                        default="both", help="post-processing of the speed rows (the other "
                        "rows: batched)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    precisions = (args.precisions or ("fp32,bf16,fp16" if device.type == "cuda"
                                      else "fp32,bf16")).split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    spec = ModelSpec("maskrcnn_resnet50_fpn", args.min_size, args.max_size, 0.05, 0.5,
                     args.detections, args.proposals)
    state_dict = resolve_weights("random", spec, seed=0).payload
    report: dict = {"environment": environment(device), "settings": vars(args)}
    print(json.dumps(report["environment"]), flush=True)
    arrays = photos(args.images, args.width, args.height)

    # Stage agreement: trained-scale outputs (precision.scale_to_trained_outputs), fp32 islands
    # on and off.
    model = build_model(spec)
    model.load_state_dict(state_dict)
    model.to(device)
    scale_to_trained_outputs(model, image_tensor(photos(1, 640, 480)[0], device))
    report["agreement"] = []
    for precision in (precisions if not args.only else []):
        if precision == "fp32":
            continue
        for islands in (True, False):
            found = [stage_agreement(model, image_tensor(a, device), precision, islands)
                     for a in arrays[:args.agreement_images]]
            report["agreement"].append(summarise(found))
            print(json.dumps(report["agreement"][-1]), flush=True)
    remove_fp32_islands(model)
    del model

    report["speed"] = []
    modes = ("per-image", "batched") if args.postprocess == "both" else (args.postprocess,)
    for precision in precisions:
        for mode in modes:
            model = model_for(spec, state_dict, device, precision, postprocess=mode)
            for batch in batch_sizes:
                report["speed"].append({**time_predictor(model, arrays, batch, precision,
                                                         device), "postprocess": mode})
                print(json.dumps(report["speed"][-1]), flush=True)
        batch = max(batch_sizes)
        if precision != "fp32":
            report["speed"].append(time_predictor(model, arrays, batch, precision, device,
                                                  channels_last=False))
            print(json.dumps(report["speed"][-1]), flush=True)
        if precision == precisions[-1]:
            mixed = photos(args.images, args.width, args.height, mixed=True)
            for canvas in ("exact", "fixed"):
                row = time_predictor(model, mixed, batch, precision, device, canvas=canvas)
                row["images"] = "mixed landscape/portrait/square"
                row["group_sizes"] = group_sizes(model, mixed, batch, canvas)
                report["speed"].append(row)
                print(json.dumps(row), flush=True)
            for thread_batch in (batch_sizes if args.thread_sweep else [batch]):
                for threads in [int(t) for t in args.threads.split(",")]:
                    row = time_concurrent(model, arrays, thread_batch, precision, device,
                                          threads)
                    row["cudnn_benchmark"] = args.cudnn_benchmark
                    report["speed"].append(row)
                    print(json.dumps(row), flush=True)
            report["host_syncs"] = count_host_syncs(model, arrays[:8], precision, device)
            print(json.dumps(report["host_syncs"]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report["oom_recovery"] = ({"skipped": "--only"} if args.only else
                              oom_recovery(spec, state_dict, arrays[:8], device, precisions[-1]))
    print(json.dumps(report["oom_recovery"]), flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

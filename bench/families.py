"""Each optional model family through segpipe beside its own library's batched predict loop.

    python bench/families.py [--images 16] [--families yolo-seg,yolo-detect,mask2former,detr]
        [--threads 2] [--batch-size 4] [--no-record]

On the same generated JPEGs (``bench/throughput.make_images``: scikit-image's photos, 640×480),
for each family, at the same torch thread count and batch size, with seeded random weights
(nothing downloads here; checkpoints from the libraries' own configs, as the tests build them):

* ``library``: the library's own loop from the files, a batch at a time:
  ``YOLO(FILE).predict(paths, conf=, iou=, imgsz=640, retina_masks=True)``; transformers:
  PIL decode, the image
  processor, the model and the processor's post-processing, batch by batch;
* ``segpipe``: ``segpipe segment`` on a local Ray (one predictor actor, ``--torch-threads``),
  decode, predict, masks encoded to COCO RLE and Parquet written, on ``--images`` and on
  ``2 × --images`` images, after a run that warms the file cache: the *marginal* images/s
  (the second ``--images`` over the difference of the two pipeline times: what each further
  image costs, the actor's start-up and the first batches' latency left out), the pipeline's
  images/s on all of them (``run.json``: start-up included) and the whole command's.

The library loop runs on the ``2 × --images`` images with its model loaded and warmed up.

Both loops run in processes of their own. Appends a dated table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

#: family → (segpipe --arch, what the checkpoint is, score floor, NMS IoU)
FAMILIES = {
    "yolo-seg": ("ultralytics", "yolo11n-seg.yaml, 3 classes", 0.25, 0.7),
    "yolo-detect": ("ultralytics", "yolo11n.yaml, 4 classes", 0.25, 0.7),
    "mask2former": ("transformers", "Mask2Former, its default config (Swin-S-sized), 80 classes, 100 queries, "
                    "shortest side 480", 0.005, 0.5),
    "detr": ("transformers", "DETR, ResNet-50-sized backbone, 80 classes, 100 queries, shortest side 480",
             0.001, 0.5),
}
SIDE = 480


def build(family: str, folder: Path) -> Path:
    """The family's checkpoint (file or folder) with seeded random weights."""
    import torch

    if family.startswith("yolo"):
        from family_checkpoints import yolo_checkpoint

        yaml = "yolo11n-seg.yaml" if family == "yolo-seg" else "yolo11n.yaml"
        return yolo_checkpoint(folder / f"{family}.pt", yaml, classes=3 if family == "yolo-seg" else 4,
                               image_size=640)
    from segpipe.model.categories import COCO_CATEGORIES

    names = {k: c.name for k, c in enumerate(COCO_CATEGORIES)}
    path = folder / family
    torch.manual_seed(0)
    if family == "mask2former":
        from transformers import (
            Mask2FormerConfig,
            Mask2FormerForUniversalSegmentation,
            Mask2FormerImageProcessor,
        )

        config = Mask2FormerConfig(id2label=names, label2id={v: k for k, v in names.items()},
                                   use_pretrained_backbone=False)
        Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(path)
        Mask2FormerImageProcessor(size={"shortest_edge": SIDE, "longest_edge": SIDE * 5 // 3}).save_pretrained(path)
    else:
        from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

        config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                            backbone_config=ResNetConfig(out_features=["stage4"]),
                            id2label=names, label2id={v: k for k, v in names.items()})
        DetrForObjectDetection(config).eval().save_pretrained(path)
        DetrImageProcessor(size={"shortest_edge": SIDE, "longest_edge": SIDE * 5 // 3}).save_pretrained(path)
    return path


def library_loop(family: str, weights: Path, paths: list[Path], threads: int, batch: int) -> dict:
    """The library's own predict over ``paths``, in batches (run in a process of its own)."""
    import torch

    torch.set_num_threads(threads)
    _, _, floor, iou = FAMILIES[family]
    found = 0
    if family.startswith("yolo"):
        from ultralytics import YOLO

        model = YOLO(str(weights))
        model.predict([str(paths[0])], imgsz=640, verbose=False)   # warm-up, as segpipe's actor
        start = time.perf_counter()
        for at in range(0, len(paths), batch):
            for result in model.predict([str(p) for p in paths[at:at + batch]], conf=floor, iou=iou,
                                        imgsz=640, max_det=100, retina_masks=True, verbose=False):
                found += len(result.boxes)
                if result.masks is not None:   # as segpipe: each mask to COCO RLE
                    from pycocotools import mask as mask_utils

                    masks = result.masks.data.numpy().astype("uint8")
                    for mask in masks:
                        mask_utils.encode(mask.copy(order="F"))
        return {"seconds": time.perf_counter() - start, "detections": found}
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, AutoModelForUniversalSegmentation

    masked = family == "mask2former"
    build = AutoModelForUniversalSegmentation if masked else AutoModelForObjectDetection
    model = build.from_pretrained(weights).eval()
    processor = AutoImageProcessor.from_pretrained(weights)
    start = time.perf_counter()
    for at in range(0, len(paths), batch):
        images = [np.asarray(Image.open(p).convert("RGB")).copy() for p in paths[at:at + batch]]
        sizes = [im.shape[:2] for im in images]
        with torch.inference_mode():
            outputs = model(**processor(images=images, return_tensors="pt"))
        if masked:
            from pycocotools import mask as mask_utils

            for result in processor.post_process_instance_segmentation(
                    outputs, threshold=floor, target_sizes=sizes, return_binary_maps=True):
                found += len(result["segments_info"])
                if result["segments_info"]:
                    for mask in result["segmentation"].numpy().astype("uint8"):
                        mask_utils.encode(np.asfortranarray(mask))
        else:
            for result in processor.post_process_object_detection(outputs, threshold=floor,
                                                                   target_sizes=sizes):
                found += len(result["scores"])
    return {"seconds": time.perf_counter() - start, "detections": found}


def segpipe_run(family: str, weights: Path, images: Path, out: Path, threads: int, batch: int) -> dict:
    arch, _, floor, iou = FAMILIES[family]
    start = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "segpipe"), "segment", str(images), str(out), "--arch", arch,
         "--weights", str(weights), "--torch-threads", str(threads), "--batch-size", str(batch),
         "--actors", "1", "--score-floor", str(floor), "--nms-threshold", str(iou),
         "--detections-per-image", "100", "--no-progress",
         *(["--image-size", "640"] if arch == "ultralytics" else [])],
        capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    run = json.loads((out / "run.json").read_text())
    return {"seconds": wall, "pipeline_s": run["timings_s"]["pipeline"],
            "pipeline_images_per_s": run["images_per_s"]["pipeline"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--library-only", nargs=3, metavar=("FAMILY", "WEIGHTS", "IMAGES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library_only:
        family, weights, images = args.library_only
        paths = sorted(Path(images).glob("*.jpg"))
        print(json.dumps(library_loop(family, Path(weights), paths, args.threads, args.batch_size)))
        return 0
    from throughput import make_images

    rows = []
    with tempfile.TemporaryDirectory(prefix="segpipe-families-") as temp:
        root = Path(temp)
        half, images = root / "half", root / "images"
        for k, path in enumerate(make_images(images, 2 * args.images, 640, 480)):
            if k < args.images:
                half.mkdir(exist_ok=True)
                (half / path.name).write_bytes(path.read_bytes())
        for family in args.families.split(","):
            weights = build(family, root)
            line = subprocess.run([sys.executable, __file__, "--library-only", family, str(weights),
                                   str(images), "--threads", str(args.threads), "--batch-size",
                                   str(args.batch_size)], capture_output=True, text=True)
            if line.returncode != 0:
                raise SystemExit(line.stderr[-2000:])
            library = json.loads(line.stdout.strip().splitlines()[-1])
            # a first run warms the file cache (imports, weights): the two measured runs start alike
            segpipe_run(family, weights, half, root / f"warm-{family}", args.threads, args.batch_size)
            small = segpipe_run(family, weights, half, root / f"half-{family}", args.threads, args.batch_size)
            ours = segpipe_run(family, weights, images, root / f"out-{family}", args.threads, args.batch_size)
            row = {"family": family, "library_images_per_s": 2 * args.images / library["seconds"],
                   "segpipe_pipeline_images_per_s": ours["pipeline_images_per_s"],
                   "segpipe_marginal_images_per_s": args.images / (ours["pipeline_s"] - small["pipeline_s"]),
                   "segpipe_command_images_per_s": 2 * args.images / ours["seconds"],
                   "library_detections": library["detections"]}
            row["ratio"] = row["segpipe_marginal_images_per_s"] / row["library_images_per_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.no_record:
        record(rows, args)
    return 0


def record(rows: list[dict], args: argparse.Namespace) -> None:
    import torch

    lines = [f"\n### {dt.date.today().isoformat()} — the model families beside their libraries' "
             f"own predict, CPU ({os.cpu_count()} cores, {platform.machine()})\n",
             f"`python bench/families.py {' '.join(sys.argv[1:])}`  ",
             f"{2 * args.images} JPEGs 640×480, torch {torch.__version__}, {args.threads} torch "
             f"threads on both sides, batch {args.batch_size}, seeded random weights (the "
             "checkpoints below). The library loop decodes the same files and, for masks, "
             "RLE-encodes each as segpipe does. segpipe (decode, predict, encode to RLE, Parquet, "
             f"on a local Ray): marginal images/s = {args.images} / (pipeline time of "
             f"{2 * args.images} images − of {args.images}), the per-image rate with the actor's "
             "start-up left out; then the pipeline's images/s with it (run.json) and the whole "
             "command's.\n",
             "| family | checkpoint | library images/s | segpipe marginal images/s | × library | "
             "segpipe pipeline images/s | whole command | library detections |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['family']} | {FAMILIES[r['family']][1]} | {r['library_images_per_s']:.3f} | "
                     f"{r['segpipe_marginal_images_per_s']:.3f} | {r['ratio']:.2f} | "
                     f"{r['segpipe_pipeline_images_per_s']:.3f} | "
                     f"{r['segpipe_command_images_per_s']:.3f} | {r['library_detections']} |")
    path = ROOT / "docs" / "benchmarks.md"
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    raise SystemExit(main())

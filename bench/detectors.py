"""Mask R-CNN against Faster R-CNN on the same images: the classic tutorial's comparison table.

    python bench/detectors.py [--images 12] [--device cpu|cuda] [--batch-size 1]
        [--archs maskrcnn_resnet50_fpn,fasterrcnn_resnet50_fpn,...] [--no-record]

For each architecture, ``bench/throughput.py`` runs (each mode in a process of its own, on the
same generated 640×480 images, min_size 800, seeded random weights, fp32):

* ``tutorial``: the classic loop, one image at a time (decode, ``to_tensor``, the model, masks
  thresholded and RLE-encoded where the model has them);
* ``forward``: the model alone on decoded images, batch ``--batch-size``;
* ``pipeline``: ``segpipe segment`` end to end on a local Ray (start-up included), when ray is
  installed.

It prints, and appends to docs/benchmarks.md, images/s, seconds per image and peak RSS per
process for every architecture and mode, and each detector's forward time relative to Mask
R-CNN v1's.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
         "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--modes", default="tutorial,forward,pipeline")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    modes = args.modes
    try:
        import ray  # noqa: F401
    except ImportError:
        modes = ",".join(m for m in modes.split(",") if m != "pipeline")
    table = {}
    with tempfile.TemporaryDirectory(prefix="segpipe-detectors-") as tmp:
        for arch in args.archs.split(","):
            out = Path(tmp) / f"{arch}.json"
            cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--arch", arch,
                   "--images", str(args.images), "--device", args.device, "--batch-size",
                   str(args.batch_size), "--modes", modes, "--no-record", "--json", str(out)]
            print(f"{arch}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            table[arch] = {r["mode"]: r for r in json.loads(out.read_text())}
    base = table.get("maskrcnn_resnet50_fpn", {}).get("forward")
    lines = ["| detector | mode | images/s | s/image | forward time vs Mask R-CNN v1 | "
             "peak RSS MB |", "| --- | --- | --- | --- | --- | --- |"]
    for arch, rows in table.items():
        for mode, r in rows.items():
            relative = (f"{base['images_per_s'] / r['images_per_s']:.2f}×"
                        if base and mode == "forward" else "")
            lines.append(f"| {arch} | {mode} | {r['images_per_s']:.3f} | "
                         f"{1 / r['images_per_s']:.2f} | {relative} | {r['peak_rss_mb']:.0f} |")
    print("\n".join(lines))
    if not args.no_record:
        import torch
        import torchvision

        device = (torch.cuda.get_device_name() if args.device == "cuda"
                  else f"CPU ({os.cpu_count()} cores, {platform.machine()})")
        header = [f"\n## {dt.date.today().isoformat()} — detectors, {device}\n",
                  f"`python bench/detectors.py {' '.join(sys.argv[1:])}`: {args.images} images "
                  f"640×480, min_size 800, batch {args.batch_size}, fp32, seeded random weights "
                  f"(100 detections per image at score floor 0.05), torch {torch.__version__}, "
                  f"torchvision {torchvision.__version__}\n"]
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU cost of the encode stage (paste + RLE) per image, and of re-binarising stored masks.

    python bench/encode_speed.py [--images 20] [--per-image 100] [--width 1200 --height 800]
        [--smallest 16 --largest 500] [--no-record]

Detections are ``tests/synthetic.blob_detections``: box sides log-uniform between
``--smallest`` and ``--largest`` px, smooth blob masks as a trained mask head gives. Times, on
one thread, ``encode.encode_detections`` (what an encode actor does per image: paste every
soft mask inside its box, threshold, COCO RLE, plus the stored soft mask) and prints the box
size distribution with the figures. Appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--smallest", type=int, default=16)
    parser.add_argument("--largest", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from segpipe.encode.encoder import encode_detections
    from segpipe.model.detections import ImageDetections
    from synthetic import blob_detections

    images = []
    for i in range(args.images):
        soft, boxes = blob_detections(args.per_image, args.height, args.width, seed=i,
                                      smallest=args.smallest, largest=args.largest)
        images.append(ImageDetections(np.ones(len(boxes), np.int32),
                                      np.linspace(1, 0.05, len(boxes), dtype=np.float32),
                                      boxes, soft))
    encode_detections(images[0], args.height, args.width, args.threshold)   # warm-up
    times, runs = [], []
    for det in images:
        start = time.perf_counter()
        rows = encode_detections(det, args.height, args.width, args.threshold)
        times.append(time.perf_counter() - start)
        runs.append(sum(len(r["segmentation"]["counts"]) for r in rows) / len(rows))
    boxes = np.concatenate([d.boxes for d in images])
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    result = {
        "ms_per_image": round(1000 * statistics.median(times), 2),
        "ms_range": [round(1000 * min(times), 2), round(1000 * max(times), 2)],
        "detections_per_image": args.per_image,
        "box_side_px": {q: round(float(np.percentile(sides, p)), 1)
                        for q, p in (("p10", 10), ("median", 50), ("p90", 90), ("max", 100))},
        "box_pixels_per_image": int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
                                    .sum() / len(images)),
        "rle_chars_per_detection": round(statistics.mean(runs), 1),
    }
    print(json.dumps(result, indent=1))
    if not args.no_record:
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write(f"\n## {dt.date.today().isoformat()} — encode, CPU ({platform.machine()}, "
                    "one thread)\n\n"
                    f"`python bench/encode_speed.py {' '.join(sys.argv[1:])}`: {args.images} "
                    f"images {args.width}×{args.height}, {args.per_image} blob detections "
                    f"each\n\n```json\n{json.dumps(result, indent=1)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

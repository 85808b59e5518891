"""Stream many small images through ``segpipe segment`` and watch memory stay flat.

    python bench/scale.py [--images 20000] [--size 64] [--rows-per-file 1000] [--no-record]

Generates ``--images`` synthetic PNGs (random shapes on noise), runs the segment job on a local
Ray with a tiny model configuration (seeded random weights, min_size = size, 5 detections per
image from 20 proposals), and samples every few seconds the RSS of the driver and of each
predictor and encoder actor process, plus Ray's object-store spilling. Reports the figures at
start, middle and end, checks that every image came out exactly once and that no Parquet file
holds more than ``--rows-per-file`` rows, and appends a dated row to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, size - 8, 2))
            draw.ellipse([x, y, x + 8 + int(rng.integers(0, size // 2)),
                          y + 8 + int(rng.integers(0, size // 2))],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{i:06d}.png")


def sample_memory() -> dict:
    import psutil
    import ray

    def rss_of(name: str) -> list[float]:
        return [p.info["memory_info"].rss / 2**20
                for p in psutil.process_iter(["cmdline", "memory_info"])
                if p.info["cmdline"] and name in p.info["cmdline"][0]]

    spilled = 0.0
    try:
        from ray._private.internal_api import memory_summary

        found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
        spilled = float(found.group(1)) if found else 0.0
    except Exception:
        pass
    return {"t": time.time(), "driver_mb": psutil.Process().memory_info().rss / 2**20,
            "actor_mb": rss_of("PredictStage"), "encoder_mb": rss_of("MaskEncoder"),
            "spilled_mb": spilled, "ray": ray.is_initialized()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    from segpipe.config import SegmentConfig
    from segpipe.commands.segment import run_segment
    from segpipe.io.run_folder import prediction_files

    work = Path(tempfile.mkdtemp(prefix="segpipe-scale-"))
    start = time.time()
    make_images(work / "images", args.images, args.size)
    print(f"generated {args.images} images in {time.time() - start:.0f} s", flush=True)
    config = SegmentConfig(input=str(work / "images"), output=str(work / "out"), weights="random",
                           min_size=args.size, max_size=args.size, detections_per_image=5,
                           proposals_per_image=20, batch_size=args.batch_size,
                           rows_per_file=args.rows_per_file, progress=False)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    samples: list[dict] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            samples.append(sample_memory())
            done.wait(5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    report = run_segment(config)
    done.set()
    watcher.join()
    samples.append(sample_memory())
    ray.shutdown()

    rows_per_file = [pq.read_metadata(p).num_rows for p in prediction_files(str(work / "out" / "predictions"))]
    ids = Counter(i for p in prediction_files(str(work / "out" / "predictions"))
                  for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
    busy = [s for s in samples if s["actor_mb"]]
    pick = {"start": busy[0], "middle": busy[len(busy) // 2], "end": busy[-1]} if busy else {}
    result = {
        "images": args.images, "ok": report.counts.ok, "errors": report.counts.errors,
        "exactly_once": len(ids) == args.images and max(ids.values()) == 1,
        "files": len(rows_per_file), "max_rows_per_file": max(rows_per_file),
        "pipeline_s": report.timings["pipeline"],
        "images_per_s": report.images_per_second["pipeline"],
        "memory": {k: {"driver_mb": round(v["driver_mb"]),
                       "actor_mb": [round(a) for a in v["actor_mb"]],
                       "encoder_mb": [round(a) for a in v["encoder_mb"]],
                       "spilled_mb": v["spilled_mb"]} for k, v in pick.items()},
        "peak_spilled_mb": max(s["spilled_mb"] for s in samples),
    }
    print(json.dumps(result, indent=1))
    if not args.no_record:
        path = ROOT / "docs" / "benchmarks.md"
        with path.open("a") as f:
            f.write(f"\n## {dt.date.today().isoformat()} — scale, CPU\n\n"
                    f"`python bench/scale.py {' '.join(sys.argv[1:])}`: {args.images} synthetic "
                    f"{args.size}×{args.size} PNGs, random weights, min_size {args.size}, 5 "
                    f"detections/image, batch {args.batch_size}, rows_per_file {args.rows_per_file}\n\n"
                    "```json\n" + json.dumps(result, indent=1) + "\n```\n")
    return 0 if result["exactly_once"] and result["max_rows_per_file"] <= args.rows_per_file else 1


if __name__ == "__main__":
    sys.exit(main())

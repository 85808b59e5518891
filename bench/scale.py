"""Stream many small images through ``segpipe segment`` and watch memory stay flat.

    python bench/scale.py [--images 20000] [--size 64] [--rows-per-file 1000] [--no-record]
    python bench/scale.py --images 1000000 --replay --json OUT.json [--resume-check]

``--replay``: WebDataset tar shards of small real JPEGs (crops of scikit-image's photos), the
real pipeline (listing, decode, encode, Parquet sink, sharded COCO, accounting) with the model
replaced by a *replay of detections recorded from a real run* (``bench/replay.py``: a bench
instrument, never selectable in segpipe). The run is made in a fresh process, whose peak RSS
is the driver's peak; the JSON holds ``images``, ``images_per_s``, ``driver_peak_mb``, the
driver's ``seconds`` per stage, ``spilled_mb`` and ``exactly_once``. ``--resume-check`` then
resumes the finished run (nothing left to do: listing, resume, to-do filter, accounting and
the COCO write again) in another fresh process and reports its seconds and peak too.

Without ``--replay``:

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

from bench import report_json  # noqa: E402


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
    if "--replay" in sys.argv or "--child" in sys.argv:
        return replay_main()
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
    from segpipe.output.run_folder import prediction_files

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


REPLAY_SIZE = 64


def photo_crops(count: int, size: int, seed: int = 0) -> list:
    """``count`` random ``size``×``size`` crops of scikit-image's real photos, as arrays."""
    import numpy as np
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    crops = []
    for k in range(count):
        photo = photos[k % len(photos)]
        y, x = (int(rng.integers(0, photo.shape[d] - size)) for d in (0, 1))
        crops.append(np.ascontiguousarray(photo[y:y + size, x:x + size, :3]))
    return crops


def make_tar_shards(folder: Path, count: int, size: int, per_tar: int = 1000) -> None:
    """WebDataset-style shards ``shard-NNNNN.tar`` of ``count`` JPEGs (``KEY.jpg`` members);
    the JPEG bytes cycle through 512 distinct crops."""
    import io
    import tarfile

    from PIL import Image

    encoded = []
    for crop in photo_crops(512, size):
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, per_tar):
        with tarfile.open(folder / f"shard-{start // per_tar:05d}.tar", "w") as tar:
            for i in range(start, min(count, start + per_tar)):
                data = encoded[i % len(encoded)]
                member = tarfile.TarInfo(f"{i:09d}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def replay_config(work: Path, args, resume: bool = False):
    from segpipe.config import SegmentConfig

    return SegmentConfig(input=str(work / "tars"), output=str(work / "out"), weights="random",
                         min_size=REPLAY_SIZE, max_size=REPLAY_SIZE,
                         detections_per_image=args.per_image, proposals_per_image=100,
                         score_floor=0.0, score_threshold=0.0, soft_masks=False,
                         batch_size=16, rows_per_file=args.rows_per_file,
                         coco_shard_images=args.coco_shard_images, progress=False,
                         resume=resume)


def replay_child(work: Path, args) -> dict:
    """One segment run in this (fresh) process with replayed detections; its own figures."""
    import pickle
    import resource

    import ray

    from bench import replay
    from segpipe.commands import segment

    replay.swap_in(pickle.loads((work / "recorded.pkl").read_bytes()))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    spilled = [0.0]
    done = threading.Event()

    def watch():
        while not done.wait(2):
            spilled[0] = max(spilled[0], sample_memory()["spilled_mb"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    report = segment.run_segment(replay_config(work, args, resume=args.child == "resume"))
    done.set()
    watcher.join()
    ray.shutdown()
    return {"images": report.counts.images, "ok": report.counts.ok,
            "annotations": report.counts.annotations,
            "accounting_complete": report.accounting.complete,
            "seconds": report.timings,
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "spilled_mb": spilled[0]}


def replay_main() -> int:
    import pickle
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--replay", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--coco-shard-images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, help="folder to work in (default: a new temporary one)")
    parser.add_argument("--resume-check", action="store_true")
    parser.add_argument("--child", choices=("run", "resume"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(replay_child(args.work, args)))
        return 0

    import pyarrow.parquet as pq

    from bench.replay import LABEL, record_detections
    from segpipe.output.run_folder import prediction_files

    work = args.work or Path(tempfile.mkdtemp(prefix="segpipe-scale-"))
    start = time.time()
    make_tar_shards(work / "tars", args.images, REPLAY_SIZE)
    generated_s = time.time() - start
    config = replay_config(work, args)
    recorded = record_detections(photo_crops(16, REPLAY_SIZE, seed=1), config)
    (work / "recorded.pkl").write_bytes(pickle.dumps(recorded))
    print(f"generated {args.images} JPEGs in tar shards in {generated_s:.0f} s; recorded "
          f"{sum(len(r.scores) for r in recorded)} detections of 16 photos", flush=True)

    def child(mode: str) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
                   "--work", str(work), "--per-image", str(args.per_image),
                   "--rows-per-file", str(args.rows_per_file),
                   "--coco-shard-images", str(args.coco_shard_images)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(done.stderr[-5000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    run = child("run")
    files = prediction_files(str(work / "out" / "predictions"))
    ids = pq.ParquetDataset(files).read(columns=["image_id"]).column("image_id")
    unique = len(ids.unique())
    coco = json.loads((work / "out" / "coco" / "index.json").read_text())
    pipeline_s = run["seconds"]["pipeline"]
    result = {
        "label": LABEL, "images": args.images, "ok": run["ok"],
        "images_per_s": round(args.images / pipeline_s, 1),
        "end_to_end_images_per_s": round(args.images / run["seconds"]["total"], 1),
        "driver_peak_mb": run["driver_peak_mb"], "seconds": run["seconds"],
        "spilled_mb": run["spilled_mb"],
        "exactly_once": unique == len(ids) == args.images and run["accounting_complete"],
        "annotations": run["annotations"], "coco_shards": len(coco["shards"]),
        "prediction_files": len(files),
        "predictions_mb": round(sum(Path(f).stat().st_size for f in files) / 2**20, 1),
        "coco_mb": round(sum(p.stat().st_size for p in (work / "out" / "coco").iterdir())
                         / 2**20, 1),
        "generation_s": round(generated_s, 1),
    }
    if args.resume_check:
        resumed = child("resume")
        result["resume"] = {"seconds": resumed["seconds"],
                            "driver_peak_mb": resumed["driver_peak_mb"]}
    report_json(result, args.json)
    return 0 if result["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())

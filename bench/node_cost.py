"""What a GPU node needs from its CPUs: CPU milliseconds per image per stage at COCO size, with the
model replaced by replayed detections (a bench instrument, never selectable in segpipe).

    .venv/bin/python bench/node_cost.py [--images 400] [--width 1333 --height 800]
        [--per-image 100] [--decode cpu|predictor] [--no-pipeline] [--json OUT.json]

Inputs: ``--images`` JPEGs (quality 90) of scikit-image's real photos, resized to
``--width``×``--height`` and flipped or shifted so that no two are alike. Detections: 100
*replayed detections* per image (``trained_like``): boxes of 8-500 px in COCO's shares of
small, medium and large objects, solid 28×28 soft masks
with sharp edges, a quarter with a hole, a fifth cut in two by a bar, scores spread 0.05-1 -
what a trained Mask R-CNN hands the encoder, not the speckles of random weights.

Two measurements, both CPU time (user + system, every thread), so another process on the
machine slows them but barely changes them:

* ``stages``: segpipe's own stage functions in this process, in turn, on blocks of 16 images
  (after one untimed block of two, as a long-lived actor has loaded its compiled paste):
  ``decode`` (``io.decode.decode_batch``: read and decode to the pixel column), ``predictor
  glue`` (the replayed predictor's packing, ``bench.replay.ReplayedDetections``),
  ``encode`` (``encode.encoder.encode_batch``: paste, RLE, soft masks), ``parquet``
  (``pyarrow.parquet.write_table`` of the encoded rows); with the bytes each stage's output
  block puts in Ray's object store per image.
* ``pipeline``: ``segpipe segment`` on a local Ray with the replay swapped in (in a child
  process, as ``bench/scale.py`` does), run at N/2 and at N images: the CPU time of the
  driver and every Ray process (raylet, GCS, workers), the marginal cost per image being
  (CPU(N) - CPU(N/2)) / (N/2), so start-up drops out. It holds what the stages do plus Ray's
  own work (scheduling, serialisation, object-store copies) and the end-of-run COCO write.

Cores per GPU at ``TARGET`` images/s = marginal CPU seconds per image × ``TARGET``.

``--decode predictor`` runs segpipe's ``decode: predictor``: the decode tasks read and check
each JPEG's header and pass its bytes on; the JPEG decode itself is the predictor's, on the GPU
(nvJPEG), which the replay stands in for - so it is in none of these CPU figures (nor is any
host work nvJPEG does): that is for ``bench/gpu_node.sh`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import report_json  # noqa: E402

LABEL = "replayed detections"
#: The GPU node's goal (issue 33): images per second per GPU.
TARGET = 250
BLOCK = 16
#: COCO's shares of small (< 32 px), medium and large (> 96 px) objects, and the sizes drawn
#: (log-uniform) in each band.
COCO_SIZE_SHARES = (0.41, 0.34, 0.25)
SIZE_BANDS = ((8, 32), (32, 96), (96, 500))


def make_jpegs(folder: Path, count: int, width: int, height: int) -> None:
    """``count`` JPEGs of real photos at ``width``×``height`` (each shifted or flipped)."""
    from PIL import Image, ImageOps
    from skimage import data

    photos = [Image.fromarray(np.asarray(image)[..., :3]) for image in
              (data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.stereo_motorcycle()[0], data.retina())]
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        photo = photos[k % len(photos)]
        shift = (k // len(photos)) % 40
        image = photo.crop((shift, shift, photo.width, photo.height)).resize((width, height),
                                                                          Image.BILINEAR)
        if (k // len(photos)) % 2:
            image = ImageOps.mirror(image)
        image.save(folder / f"{k:07d}.jpg", quality=90)


def trained_like(width: int, height: int, count: int, rng: np.random.Generator):
    """``count`` detections like a trained Mask R-CNN's (see the module doc)."""
    from segpipe.model.detections import ImageDetections

    band = rng.choice(3, count, p=COCO_SIZE_SHARES)
    low, high = np.array(SIZE_BANDS)[band].T
    size = np.exp(rng.uniform(np.log(low), np.log(high)))
    aspect = np.exp(rng.uniform(-0.7, 0.7, count))
    w = np.minimum(size * np.sqrt(aspect), width - 1)
    h = np.minimum(size / np.sqrt(aspect), height - 1)
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)
    v, u = np.mgrid[-1:1:28j, -1:1:28j]
    masks = np.empty((count, 28, 28), np.float32)
    for k in range(count):
        cx, cy = rng.uniform(-0.15, 0.15, 2)
        radius = rng.uniform(0.7, 0.95)
        distance = np.hypot(u - cx, (v - cy) * rng.uniform(0.8, 1.25))
        inside = radius - distance
        if k % 4 == 0:
            inside = np.minimum(inside, distance - radius * 0.4)
        if k % 5 == 0:
            inside = np.minimum(inside, np.abs(u - rng.uniform(-0.3, 0.3)) - 0.08)
        masks[k] = 1 / (1 + np.exp(-inside * 25))
    scores = np.sort(rng.uniform(0.05, 1, count))[::-1].astype(np.float32)
    labels = rng.integers(1, 91, count).astype(np.int32)
    return ImageDetections(labels=labels, scores=scores, boxes=boxes, soft_masks=masks)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def stage_costs(folder: Path, recorded: list, decode: str = "cpu") -> dict:
    """CPU ms per image of each stage function, and the bytes per image of its output."""
    import pyarrow.parquet as pq

    from bench.replay import ReplayedDetections
    from segpipe.config import SegmentConfig
    from segpipe.encode.encoder import encode_batch
    from segpipe.io.decode import decode_batch
    from segpipe.io.sources import list_images
    from segpipe.pipeline import decode_limits

    listing = list_images(str(folder))
    limits = decode_limits(SegmentConfig(input=str(folder), output=str(folder / "unused")))
    keep_jpegs = decode == "predictor"
    ReplayedDetections.recorded = recorded
    predictor = ReplayedDetections()
    cpu = dict.fromkeys(("decode", "predictor glue", "encode", "parquet"), 0.0)
    nbytes = dict.fromkeys(("decoded", "predicted", "encoded"), 0)
    with tempfile.TemporaryDirectory() as scratch:
        warm = encode_batch(predictor(decode_batch(listing.slice(0, 2), str(folder), limits,
                                                   keep_jpegs)),
                            0.5, keep_soft_masks=True)   # a long-lived actor pays this once:
        pq.write_table(warm, f"{scratch}/warm.parquet")   # the compiled paste's first load
        for start in range(0, listing.num_rows, BLOCK):
            block = listing.slice(start, BLOCK)
            t = _cpu()
            decoded = decode_batch(block, str(folder), limits, keep_jpegs)
            cpu["decode"] += _cpu() - t
            t = _cpu()
            predicted = predictor(decoded)
            cpu["predictor glue"] += _cpu() - t
            t = _cpu()
            encoded = encode_batch(predicted, 0.5, keep_soft_masks=True)
            cpu["encode"] += _cpu() - t
            t = _cpu()
            pq.write_table(encoded, f"{scratch}/{start}.parquet")
            cpu["parquet"] += _cpu() - t
            nbytes["decoded"] += decoded.nbytes
            nbytes["predicted"] += predicted.nbytes
            nbytes["encoded"] += encoded.nbytes
    n = listing.num_rows
    return {"cpu_ms_per_image": {k: round(1000 * v / n, 2) for k, v in cpu.items()},
            "object_store_bytes_per_image": {k: round(v / n) for k, v in nbytes.items()}}


class ProcessTreeCpu:
    """The CPU seconds of a process and all its descendants, sampled every ``interval`` s
    (a descendant's last interval before it exits is lost): ``psutil`` sees Ray's workers,
    which are not waited for by this process."""

    def __init__(self, interval: float = 0.2):
        import threading
        self.seen: dict[tuple[int, float], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil
        root = psutil.Process()
        for process in [root, *root.children(recursive=True)]:
            try:
                t = process.cpu_times()
                self.seen[(process.pid, process.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def _watch(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self._sample()

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        self._sample()
        return sum(self.seen.values())


def pipeline_child(folder: Path, out: Path, recorded_path: Path, decode: str) -> dict:
    """``segpipe segment`` of ``folder`` with the replay swapped in, in this process; the CPU
    seconds of this process and of every process it started (Ray's)."""
    import ray

    from bench import replay
    from segpipe.commands import segment
    from segpipe.config import SegmentConfig

    replay.swap_in(pickle.loads(recorded_path.read_bytes()))
    started = time.perf_counter()
    cpu = ProcessTreeCpu()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    config = SegmentConfig(input=str(folder), output=str(out), weights="random",
                           detections_per_image=100, score_floor=0.0, score_threshold=0.0,
                           batch_size=BLOCK, progress=False, decode=decode)
    report = segment.run_segment(config)
    seconds = time.perf_counter() - started
    total = cpu.total()
    ray.shutdown()
    return {"images": report.counts.images, "ok": report.counts.ok,
            "annotations": report.counts.annotations, "cpu_s": round(total, 2),
            "wall_s": round(seconds, 2),
            "timings": report.timings, "complete": report.accounting.complete}


def pipeline_cost(folder: Path, images: int, recorded_path: Path, decode: str = "cpu") -> dict:
    """Marginal CPU per image of the whole pipeline, from runs of ``images``/2 and ``images``."""
    runs = {}
    for count in (images // 2, images):
        subset = folder.parent / f"first-{count}"
        subset.mkdir(exist_ok=True)
        for path in sorted(folder.iterdir())[:count]:
            target = subset / path.name
            if not target.exists():
                os.link(path, target)
        out = folder.parent / f"out-{count}"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(subset),
                   str(out), str(recorded_path), decode]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(done.stderr[-5000:])
        runs[count] = json.loads(done.stdout.strip().splitlines()[-1])
        if runs[count]["ok"] != count or not runs[count]["complete"]:
            raise SystemExit(f"the run of {count} images lost some: {runs[count]}")
    half, full = runs[images // 2], runs[images]
    marginal = (full["cpu_s"] - half["cpu_s"]) / (images - images // 2)
    return {"runs": runs, "marginal_cpu_ms_per_image": round(1000 * marginal, 2),
            "cores_per_gpu_at_target": round(marginal * TARGET, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--decode", choices=("cpu", "predictor"), default="cpu",
                        help="segpipe's decode setting (see the module doc)")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, out, recorded, decode = args.child
        print(json.dumps(pipeline_child(Path(folder), Path(out), Path(recorded), decode)))
        return 0
    with tempfile.TemporaryDirectory(prefix="segpipe-node-cost-") as work:
        folder = Path(work) / "jpegs"
        make_jpegs(folder, args.images, args.width, args.height)
        rng = np.random.default_rng(0)
        recorded = [trained_like(args.width, args.height, args.per_image, rng) for _ in range(32)]
        recorded_path = Path(work) / "recorded.pkl"
        recorded_path.write_bytes(pickle.dumps(recorded))
        result = {"label": LABEL, "images": args.images, "size": [args.width, args.height],
                  "detections_per_image": args.per_image, "target_images_per_s": TARGET,
                  "decode": args.decode, **stage_costs(folder, recorded, args.decode)}
        stages_ms = sum(result["cpu_ms_per_image"].values())
        result["stages_cpu_ms_per_image"] = round(stages_ms, 2)
        result["stages_cores_per_gpu_at_target"] = round(stages_ms * TARGET / 1000, 2)
        if args.pipeline:
            result["pipeline"] = pipeline_cost(folder, args.images, recorded_path, args.decode)
    report_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

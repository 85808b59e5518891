"""Throughput of segpipe against the classic tutorial loop and the bare model, on the same images.

    python bench/throughput.py [--images 64] [--width 640 --height 480] [--arch ...]
        [--device cpu|cuda] [--batch-size 4] [--precision fp32|bf16|fp16] [--min-size 800]
        [--modes decode,tutorial,forward,forward_per_core,predictor,pipeline] [--repeats 3]
        [--no-record] [--json PATH]

Each mode runs ``--repeats`` times (median reported, with the range), each time in a process
of its own (so peak memory is its own), on the same generated JPEGs (scikit-image's sample
photos, flipped and cropped to the requested size). Every mode times the same work from the
files on: reading and decoding each JPEG is inside every timer, as in the tutorial, and the
``decode`` mode times it alone so it can be subtracted.

0. ``decode``    JPEG read + decode to RGB arrays, nothing else;
1. ``tutorial``  the classic ``get_prediction`` loop: one image at a time, always fp32,
                 torchvision's full-canvas mask paste, ``masks > 0.5``, one pycocotools RLE
                 per mask;
2. ``forward``   decode and the model forward only (transform, backbone, RPN, ROI heads; no
                 paste, no encode) in batches of ``--batch-size``, at ``--precision``: the
                 compute floor of one process with torch's default threads;
   ``forward_fp32`` (when ``--precision`` is not fp32) the same at fp32: ``forward`` over it
                 is the precision gain, apart from what the pipeline adds;
   ``forward_per_core`` (CPU) the forward in one single-threaded process per core, each on
                 its share of the images, started together: the CPU's throughput floor when
                 the cores work independently, as segpipe's CPU predictor pool does;
3. ``predictor`` decode, segpipe's predictor and its encode stage, without Ray;
4. ``pipeline``  the whole ``segpipe segment`` on a local Ray, start-up and writing included;
                 besides the driver's peak RSS it reports the predictor actors' (polled VmHWM).

Weights are seeded random (no download here); the score floor is 0.05, at which random weights
keep the full ``detections_per_image`` (100) per image, a realistic load for paste and encode.
Ratios within the run-to-run noise (``NOISE``) are marked as ties. Appends a dated table to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("decode", "tutorial", "forward", "predictor", "pipeline")
CPU_MODES = ("decode", "tutorial", "forward", "forward_per_core", "predictor", "pipeline")
RATIO_BASES = ("forward", "forward_per_core", "tutorial")
#: Run-to-run noise measured on the 2-core machine (docs/benchmarks.md): ratios closer to 1
#: than this are reported as ties.
NOISE = 0.10


def make_images(folder: Path, count: int, width: int, height: int,
                mixed: bool = False) -> list[Path]:
    """``count`` distinct JPEGs of ``width×height`` made from scikit-image's photos; ``mixed``:
    every third one portrait (``height×width``) and every third one square."""
    import numpy as np
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.stereo_motorcycle()[0]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    full = (width, height)
    for i in range(count):
        width, height = full
        if mixed and i % 3 == 1:
            width, height = full[1], full[0]
        elif mixed and i % 3 == 2:
            width = height = min(full)
        base = Image.fromarray(sources[i % len(sources)])
        scale = max(width / base.width, height / base.height) * (1 + 0.1 * (i // len(sources) % 4))
        big = base.resize((int(base.width * scale) + 1, int(base.height * scale) + 1))
        x = (i * 37) % (big.width - width + 1)
        y = (i * 23) % (big.height - height + 1)
        crop = np.asarray(big.crop((x, y, x + width, y + height)))
        if i % 2:
            crop = crop[:, ::-1]
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).save(path, quality=90)
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM); ru_maxrss would include the parent's peak."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


class ActorMemory:
    """Peak RSS of the Ray actor processes whose title names ``name``, polled from /proc
    (VmHWM, each process's own peak) while the block runs."""

    def __init__(self, name: str, period_s: float = 0.5):
        self.name, self.period_s, self.peaks = name, period_s, {}

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self.period_s):
            for process in psutil.process_iter(["cmdline"]):
                if self.name in " ".join(process.info["cmdline"] or []):
                    try:
                        status = Path(f"/proc/{process.pid}/status").read_text()
                    except OSError:
                        continue
                    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), hwm)

    @property
    def peak_mb(self) -> float:
        return max(self.peaks.values(), default=0.0)

    def __enter__(self) -> "ActorMemory":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def forward_share(args: argparse.Namespace, paths: list[Path], barrier, results) -> None:
    """One single-threaded forward process of ``forward_per_core``: time the loop over ``paths``."""
    args.threads = 1  # run_mode applies it
    result = run_mode("forward", args, paths, barrier)
    results.put({**result, "peak_rss_mb": peak_rss_mb()})


def forward_per_core(args: argparse.Namespace, paths: list[Path]) -> dict:
    """``forward`` in one 1-thread process per core; the time is the slowest process's."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cores = os.cpu_count() or 1
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=forward_share, args=(args, paths[i::cores], barrier, results))
             for i in range(cores)]
    for p in procs:
        p.start()
    shares = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return {"seconds": max(r["seconds"] for r in shares),
            "detections": sum(r["detections"] for r in shares), "processes": cores,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in shares)}


def run_mode(mode: str, args: argparse.Namespace, paths: list[Path], barrier=None) -> dict:
    """Time one mode in this process; return its figures (``barrier``: wait there to start)."""
    if mode == "forward_per_core":
        return forward_per_core(args, paths)
    import numpy as np
    import torch
    from PIL import Image

    from segpipe.io.decode import DecodeLimits, decode_image
    from segpipe.model.build import ModelSpec, build_model
    from segpipe.model.resolved import resolve_weights

    spec = ModelSpec(args.arch, args.min_size, args.max_size, args.score_floor, 0.5,
                     args.detections, 1000)
    device = torch.device(args.device)
    weights = resolve_weights("random", spec, seed=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = DecodeLimits(10**9, 1 << 30)
    detections = 0

    def decoded(batch_paths):
        """Every mode decodes inside its timer, as the tutorial does (``Image.open``)."""
        return [decode_image(p.read_bytes(), limits) for p in batch_paths]

    if mode == "decode":  # the decoding every other mode includes, alone
        start = time.perf_counter()
        decoded(paths)
        return {"seconds": time.perf_counter() - start, "detections": 0}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if mode == "pipeline":
        from segpipe.config import SegmentConfig
        from segpipe.commands.segment import run_segment

        out = Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
        weights_file = out / "weights.pth"
        torch.save(weights.payload, weights_file)
        config = SegmentConfig(
            input=str(paths[0].parent), output=str(out / "run"), arch=args.arch,
            weights=str(weights_file), min_size=args.min_size, max_size=args.max_size,
            score_floor=args.score_floor, detections_per_image=args.detections,
            batch_size=args.batch_size, precision=args.precision, progress=False,
            num_gpus=1.0 if device.type == "cuda" else 0.0)
        with ActorMemory("PredictStage") as actors:
            start = time.perf_counter()
            report = run_segment(config)
            seconds = time.perf_counter() - start
        detections = report.counts.detections
        return {"seconds": seconds, "detections": detections,
                "pipeline_only_s": report.timings["pipeline"],
                "actor_peak_rss_mb": actors.peak_mb}

    model = build_model(spec)
    model.load_state_dict(weights.payload)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if mode == "tutorial":
        import torchvision.transforms.functional as TF
        from pycocotools import mask as mask_utils

        def one(path):
            image = Image.open(path).convert("RGB")
            with torch.no_grad():
                pred = model([TF.to_tensor(image).to(device)])[0]
            if "masks" not in pred:  # a box-only detector: the tutorial keeps its boxes
                return len(pred["boxes"].cpu().numpy())
            masks = (pred["masks"] > 0.5).squeeze(1).cpu().numpy()
            rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
            return len(rles)

        one(paths[0])
        sync()
        start = time.perf_counter()
        for p in paths:
            detections += one(p)
        sync()
    else:
        from segpipe.encode.encoder import encode_detections
        from segpipe.model.precision import prepare_model
        from segpipe.model.inference import image_tensor, predict_images

        batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
        precision = "fp32" if mode == "forward_fp32" else args.precision
        canvas = args.canvas
        prepare_model(model, device, precision)
        predict_images(model, [image_tensor(a, device) for a in decoded(batches[0])], precision,
                       canvas)
        sync()
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        encode_s = 0.0
        for b in batches:
            arrays = decoded(b)
            dets = predict_images(model, [image_tensor(a, device) for a in arrays], precision,
                                  canvas)
            if mode == "predictor":  # segpipe's encode stage too, timed apart
                encode_start = time.perf_counter()
                for array, det in zip(arrays, dets):
                    detections += len(encode_detections(det, array.shape[0], array.shape[1], 0.5))
                encode_s += time.perf_counter() - encode_start
            else:                    # forward, forward_fp32: the model alone
                detections += sum(len(d.scores) for d in dets)
        sync()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "detections": detections}
    if mode == "predictor":
        result["encode_s"] = encode_s
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def ray_version() -> str:
    try:
        import ray
    except ImportError:
        return "not installed"
    return ray.__version__


def record(rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    import torchvision

    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    pipeline = [r for r in rows if "pipeline_only_images_per_s" in r]
    without_start_up = (f" The `pipeline` row includes Ray's start-up; the pipeline part alone "
                        f"ran {pipeline[0]['pipeline_only_images_per_s']:.3f} images/s (median)."
                        if pipeline else "")
    predictor = [r for r in rows if "predict_only_images_per_s" in r]
    if predictor:
        without_start_up += (f" In the `predictor` row, prediction alone ran "
                             f"{predictor[0]['predict_only_images_per_s']:.3f} images/s and "
                             f"encoding took {predictor[0]['encode_ms_per_image']:.1f} ms/image "
                             f"on one core (medians).")
    path = ROOT / "docs" / "benchmarks.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nRows appended by `python bench/throughput.py`.\n")
    lines = [
        f"\n## {dt.date.today().isoformat()} — {device}\n",
        f"`python bench/throughput.py {' '.join(sys.argv[1:])}`  ",
        f"arch {args.arch}, {args.images} images {args.width}×{args.height}, min_size "
        f"{args.min_size}, max_size {args.max_size}, batch {args.batch_size}, precision "
        f"{args.precision}, score floor {args.score_floor} (random weights), torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, ray {ray_version()}\n",
        f"Each mode ran {rows[0]['repeats']} times, each in a process of its own, decoding the "
        f"JPEG files inside its timer as the tutorial does; images/s is the median, with the "
        f"range. Ratios within ±{NOISE:.0%} (the run-to-run noise here) are ties. "
        f"`tutorial` is always fp32; `forward_fp32` (with another --precision) separates the "
        f"precision gain from the pipeline's.{without_start_up}\n",
        "| mode | images/s (median) | range | × forward | × forward_per_core | × tutorial "
        "| detections/image | peak RSS MB: process | predictor actor | peak GPU MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratios = " | ".join(str(r.get(f"x_{base}", "")) for base in RATIO_BASES)
        low, high = r["images_per_s_range"]
        lines.append(f"| {r['mode']} | {r['images_per_s']:.3f} | {low:.3f}–{high:.3f} | "
                     f"{ratios} | {r['detections_per_image']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r.get('actor_peak_rss_mb') and round(r['actor_peak_rss_mb']) or ''} | "
                     f"{r.get('peak_gpu_mb') and round(r['peak_gpu_mb']) or ''} |")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--canvas", default="exact", help="batch canvas: exact | fixed")
    parser.add_argument("--mixed", action="store_true",
                        help="every third image portrait, every third square (mixed aspects)")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--score-floor", type=float, default=0.05)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--modes", help="comma-separated; default: all (forward_per_core on CPU)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each mode; the median is reported (default 3)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.modes:
        modes = CPU_MODES if args.device == "cpu" else MODES
        if ray_version() == "not installed":
            print("ray is not installed: leaving out the pipeline mode", file=sys.stderr)
            modes = tuple(m for m in modes if m != "pipeline")
        if args.precision != "fp32":  # the precision gain, apart from the pipeline's
            modes = tuple(m for mode in modes for m in (
                (mode, "forward_fp32") if mode == "forward" else (mode,)))
        args.modes = ",".join(modes)

    if args.run_mode:  # child process: one mode
        paths = sorted(Path(args.image_dir).glob("*.jpg"))
        result = run_mode(args.run_mode, args, paths)
        result["peak_rss_mb"] = max(result.get("peak_rss_mb", 0), peak_rss_mb())
        print("RESULT " + json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="segpipe-bench-images-") as tmp:
        image_dir = Path(tmp) / "images"
        make_images(image_dir, args.images, args.width, args.height, args.mixed)
        rows = []
        for mode in args.modes.split(","):
            results = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--run-mode", mode,
                       "--image-dir", str(image_dir)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"mode {mode} failed")
                results.append(json.loads(line[0][7:]))
            rates = sorted(args.images / r["seconds"] for r in results)
            result = {
                "mode": mode, "repeats": len(rates), "images_per_s": statistics.median(rates),
                "images_per_s_range": [rates[0], rates[-1]],
                "detections_per_image": results[0]["detections"] / args.images,
                **{key: max(r.get(key, 0) for r in results)
                   for key in ("peak_rss_mb", "actor_peak_rss_mb", "peak_gpu_mb")
                   if any(key in r for r in results)}}
            if any("encode_s" in r for r in results):  # prediction apart from encoding
                result["predict_only_images_per_s"] = statistics.median(
                    args.images / (r["seconds"] - r["encode_s"]) for r in results)
                result["encode_ms_per_image"] = statistics.median(
                    1000 * r["encode_s"] / args.images for r in results)
            if any("pipeline_only_s" in r for r in results):  # without Ray's start-up
                result["pipeline_only_images_per_s"] = statistics.median(
                    args.images / r["pipeline_only_s"] for r in results)
            rows.append(result)
            print(f"{mode:>16}: {result['images_per_s']:.3f} images/s (median of {len(rates)}, "
                  f"{rates[0]:.3f}-{rates[-1]:.3f}), {result['detections_per_image']:.1f} "
                  f"detections/image, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    by_mode = {r["mode"]: r["images_per_s"] for r in rows}
    for r in rows:
        for base in RATIO_BASES:
            if base in by_mode and r["mode"] != "decode":
                ratio = r["images_per_s"] / by_mode[base]
                r[f"x_{base}"] = f"{ratio:.3f}" + (" (tie)" if abs(ratio - 1) <= NOISE else "")
        if "forward_fp32" in by_mode and r["mode"] == "forward":
            r["precision_gain"] = round(r["images_per_s"] / by_mode["forward_fp32"], 3)
    print(json.dumps(rows, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_record:
        record(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A segment run on a machine that does other work too: Ray's worker priority against the command's.

    python bench/beside_other_work.py [--images 8] [--busy 3] [--size 256] [--json OUT]

Ray runs its workers at niceness 15 (``RAY_worker_niceness``); segpipe's own local Ray runs
them at the command's priority (``cluster.session.local_ray_system_config``). This runs
``segpipe segment`` (a fresh process starting its own local Ray; seeded random weights,
min_size 128) on ``--images`` synthetic images, at each priority, alone and with ``--busy``
Python busy loops beside it (processes of this script's own, at the default priority,
ended after each run). For each run: the command's wall seconds, run.json's pipeline
seconds, and when its first predictor actor had started (seconds into the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import make_images  # noqa: E402

SEGPIPE = str(Path(sys.executable).parent / "segpipe")
SMALL = ["--weights", "random", "--min-size", "128", "--max-size", "200",
         "--detections-per-image", "10", "--proposals-per-image", "100", "--no-progress"]
#: the worker niceness of each arm: Ray's own, and segpipe's (RAY_worker_niceness unset)
PRIORITIES = {"ray's niceness 15": "15", "the command's (segpipe)": None}


def run_once(images: Path, out: Path, niceness: str | None, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    if niceness is not None:
        env["RAY_worker_niceness"] = niceness
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        started = time.perf_counter()
        done = subprocess.run([SEGPIPE, "segment", str(images), str(out), *SMALL], env=env,
                              capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - started
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    run = json.loads((out / "run.json").read_text())
    starts = run["cluster"].get("predictor_starts") or [{}]
    return {"wall_s": round(wall, 1), "pipeline_s": run["timings_s"]["pipeline"],
            "first_predictor_started_s": starts[0].get("t_s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--busy", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="segpipe-beside-") as work:
        images = Path(work) / "images"
        make_images(images, args.images, args.size)
        for k, (name, niceness) in enumerate(PRIORITIES.items()):
            for busy in (0, args.busy):
                figures = run_once(images, Path(work) / f"out{k}-{busy}", niceness, busy)
                results.append({"workers": name, "busy_loops": busy, **figures})
                print(f"{name:26} {busy} busy loops: {figures}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "size": args.size,
                                         "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The end-of-run COCO write: one process against Ray tasks, one per shard, on the same predictions.

    python bench/coco_write.py OUTPUT [--shard-images 25000] [--baseline-tree DIR] [--cpus 2]

OUTPUT is a segment run's folder (``bench/scale.py --replay --work W`` leaves ``W/out``). Each
way is timed in a fresh process, ``export_coco`` alone (Ray, where used, is started first, as
it is at the end of a run): ``serial`` writes single files in this process; ``ray`` writes
shards of ``--shard-images`` images in Ray tasks on a local Ray of ``--cpus`` CPUs; with
``--baseline-tree`` (a checkout of an earlier commit) ``baseline`` is that commit's serial
write, for "today's" figure. Prints one JSON line per way and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIMED = """
import json, sys, time
from segpipe.annotations.selection import ExportOptions
from segpipe.coco.writer import export_coco
from segpipe.output.run_folder import read_run_settings
predictions, to, way, shard_images, cpus = sys.argv[1:6]
settings = read_run_settings(predictions)
options = ExportOptions(score_threshold=0.0)
kwargs = {}
if way == "ray":
    import ray
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
    kwargs = {"parallel": True, "shard_images": int(shard_images)}
elif way == "serial":
    kwargs = {"shard_images": 0}
start = time.perf_counter()
counts = export_coco(predictions, to, options, settings, **kwargs)
seconds = time.perf_counter() - start
print(json.dumps({"way": way, "seconds": round(seconds, 2), "annotations": counts.annotations,
                  "annotations_per_s": round(counts.annotations / seconds)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--shard-images", type=int, default=25000)
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    predictions = str(args.output / "predictions")
    ways = [("serial", ROOT), ("ray", ROOT)]
    if args.baseline_tree:
        ways.insert(0, ("baseline", args.baseline_tree))
    results = {}
    for way, tree in ways:
        with tempfile.TemporaryDirectory() as to:
            done = subprocess.run([sys.executable, "-c", TIMED, predictions, to, way,
                                   str(args.shard_images), str(args.cpus)], cwd=tree,
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)})
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        results[way] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[way]), flush=True)
    reference = results.get("baseline", results["serial"])
    print(json.dumps({f"{way}_over_{reference['way']}": round(r["seconds"] / reference["seconds"], 3)
                      for way, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the driver of a segment run spends outside the pipeline, at 10k, 100k and 1M images.

    python bench/driver_cost.py [--sizes 10000,100000,1000000] [--work DIR] [--json OUT]

For each size, a folder of that many (empty) ``.jpg`` files, 1,000 a subfolder, and a
predictions/ folder of one row per image (1,000 rows a file, through segpipe's sink) are made
once; then a fresh process runs the driver's own steps on them, in a run's order, with the
functions a run calls, and reports each step's seconds and the process's peak RSS after it
(``ru_maxrss``: the peak so far, so a step's figure includes the steps before it):

* ``listing``: ``sources.list_images`` (what the preflight does for an image folder);
* ``resume``: ``run_folder.read_written`` (the ids already done, after verifying predictions/);
* ``todo``: ``segment.remaining`` (the listing less the ids done; half of them here);
* ``image_table``: ``predictions.read_image_table`` (one row per image, where each row is);
* ``accounting``: ``report.account_for_inputs`` (every listed image exactly once);
* ``summary``: ``report.error_summary`` and ``report.cut_short`` (what run.json reports).

The COCO write is measured by ``bench/coco_write.py`` and the whole run by ``bench/scale.py``.
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
sys.path.insert(0, str(ROOT))

STEPS = """
import json, resource, sys, time
from segpipe.commands import report
from segpipe.commands.segment import remaining
from segpipe.io import sources
from segpipe.output import run_folder
from segpipe.output.predictions import read_image_table

folder, predictions = sys.argv[1:3]
figures = {}
def step(name, function):
    start = time.perf_counter()
    value = function()
    figures[name] = {"seconds": round(time.perf_counter() - start, 3),
                     "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return value
figures["start"] = {"peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
listing = step("listing", lambda: sources.list_images(folder))
_, done = step("resume", lambda: run_folder.read_written(predictions))
half = set(list(done)[: len(done) // 2])
todo = step("todo", lambda: remaining(listing, half))
images = step("image_table", lambda: read_image_table(predictions))
accounting = step("accounting", lambda: report.account_for_inputs(listing, images))
step("summary", lambda: (report.error_summary(images), report.cut_short(images)))
assert accounting.complete and todo.num_rows == listing.num_rows - len(half)
print(json.dumps(figures))
"""


def make_inputs(work: Path, count: int) -> tuple[Path, Path]:
    """The image folder and the predictions of ``count`` images (made once, kept in ``work``)."""
    import pyarrow as pa

    from segpipe import schema
    from segpipe.io import ownership
    from segpipe.output import run_folder
    from segpipe.output.sinks import write_prediction_file
    from segpipe.io.sources import image_id_for
    from tests.synthetic import SETTINGS

    folder, output = work / f"images-{count}", work / f"run-{count}"
    names = [f"{i // 1000:05d}/{i:09d}.jpg" for i in range(count)]
    if not folder.exists():
        for start in range(0, count, 1000):
            (folder / names[start].split("/")[0]).mkdir(parents=True)
            for name in names[start:start + 1000]:
                os.close(os.open(folder / name, os.O_CREAT | os.O_WRONLY))
    predictions = run_folder.predictions_dir(str(output))
    if not output.exists():
        for start in range(0, count, 1000):
            part = names[start:start + 1000]
            write_prediction_file(pa.table({
                "image_id": pa.array([image_id_for(n) for n in part], pa.int64()),
                "file_name": part, "width": [64] * len(part), "height": [64] * len(part),
                "status": ["ok"] * len(part), "error": pa.nulls(len(part), pa.string()),
                "detections": pa.nulls(len(part), schema.PREDICTION_SCHEMA.field("detections").type),
            }), predictions, SETTINGS)
        ownership.record_written(predictions, [Path(p).name for p in
                                               run_folder.prediction_files(predictions)],
                                 whole=True)
    return folder, Path(predictions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="segpipe-driver-"))
    results = {}
    for count in (int(s) for s in args.sizes.split(",")):
        folder, predictions = make_inputs(work, count)
        done = subprocess.run([sys.executable, "-c", STEPS, str(folder), str(predictions)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        results[count] = json.loads(done.stdout.strip().splitlines()[-1])
        print(count, json.dumps(results[count]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

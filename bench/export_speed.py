"""Speed and peak memory of ``segpipe export`` on a large synthetic predictions/ folder.

    python bench/export_speed.py [--images 10000] [--per-image 100] [--mask-threshold X]
        [--format coco|label-studio|yolo] [--again] [--no-record]

Writes ``images × per-image`` detections (random boxes on 64×64 images, with soft masks) through
segpipe's own sink, then times ``run_export`` in a fresh process and reports detections/s and
that process's peak RSS (VmHWM: its own peak, not one inherited from the parent). With
``--mask-threshold`` every mask is re-pasted from its soft mask. ``--format`` times that
export format instead of COCO (Label Studio: brush masks; YOLO: without image links).
``--again`` exports a second time into the same folder and reports that export too: every
file is then replaced, each proven segpipe's first (YOLO: one stamp per label file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--mask-threshold", type=float, default=None)
    parser.add_argument("--format", default="coco", choices=("coco", "label-studio", "yolo"))
    parser.add_argument("--address", default=None,
                        help="Ray to export on (local: start one; its start-up is timed too)")
    parser.add_argument("--again", action="store_true",
                        help="export twice into one folder: the second replaces the first's files")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from synthetic import large_predictions

    work = Path(tempfile.mkdtemp(prefix="segpipe-export-bench-"))
    start = time.time()
    total = large_predictions(work, args.images, args.per_image)
    print(f"wrote {total} detections in {time.time() - start:.0f} s", flush=True)
    image_root = "https://host/images/" if args.format == "label-studio" else None
    code = ("import json, re; from segpipe.annotations.selection import ExportOptions; "
            "from segpipe.commands.export import ExportFormat, run_export; "
            f"s = run_export({str(work)!r}, {str(work / 'export')!r}, ExportOptions("
            f"score_threshold=0.05, mask_threshold={args.mask_threshold!r}), address={args.address!r}, "
            f"export_format=ExportFormat({args.format!r}, {image_root!r})); "
            "print(json.dumps({'detections': s['counts']['detections'], "
            "'annotations': s['counts']['annotations'], 'seconds': s['seconds'], "
            "'detections_per_s': s['detections_per_s'], "
            "'peak_rss_mb': int(re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1)) / 1024}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if args.again:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True)
            result["again"] = json.loads(out.stdout.strip().splitlines()[-1])
        result["format"] = args.format
        result["written_mb"] = round(sum(f.stat().st_size for f in (work / "export").rglob("*")
                                         if f.is_file()) / 2**20, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if not args.no_record:
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write(f"\n## {dt.date.today().isoformat()} — export ({args.format}), CPU\n\n"
                    f"`python bench/export_speed.py {' '.join(sys.argv[1:])}`: {total} synthetic "
                    f"detections ({args.images} images × {args.per_image}), mask threshold "
                    f"{args.mask_threshold or 'as stored'}\n\n```json\n"
                    + json.dumps(result, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the review queue put the images with mistakes first? A plumbing check on a set with
exact ground truth and a *simulated* detector (``tests/synthetic.simulated_review_set``: its
mistakes grow with each object's difficulty, which also lowers its score and blurs its soft
mask). No trained model can be downloaded here and random weights get everything wrong, so
this shows the signals and the ranking work end to end, not that a real model's mistakes
follow them.

    .venv/bin/python bench/review_quality.py --images 1000 [--seed 0] [--json OUT.json]

Prints the share of images with at least one mistake (missed object, false or misclassified
detection, mask IoU < 0.75 at score threshold 0.5) in the first 10% and 20% of the queue,
against the whole set (what a random order gives on average), for each signal alone, and
for a baseline without signals (the images with most kept detections first).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np

from synthetic import SETTINGS, image_errors, simulated_review_set, write_predictions
from segpipe.review.queue import rank, score_images
from segpipe.review.signals import SIGNALS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, truth = simulated_review_set(args.images, seed=args.seed)
    errors = {r["file_name"]: image_errors(r, truth[r["file_name"]]) for r in rows}
    folder = Path(tempfile.mkdtemp(prefix="review-quality-"))
    try:
        write_predictions(folder, rows)
        start = time.perf_counter()
        scored = score_images(str(folder / "predictions"), SETTINGS)
        ranked = rank(scored.table)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder)
    names = ranked.column("file_name").to_pylist()
    found = np.array([errors[name] for name in names])
    wrong = found > 0
    report = {"instrument": "simulated detector (tests/synthetic.simulated_review_set)",
              "images": args.images, "seed": args.seed, "scoring_seconds": round(seconds, 3),
              "with_mistakes": round(float(wrong.mean()), 4),
              "mistakes_per_image": round(float(found.mean()), 4)}
    for share in (0.1, 0.2):
        k = max(1, int(round(args.images * share)))
        report[f"top_{share:.0%}"] = {"with_mistakes": round(float(wrong[:k].mean()), 4),
                                      "lift": round(float(wrong[:k].mean() / wrong.mean()), 3),
                                      "mistakes_per_image": round(float(found[:k].mean()), 4)}
    k = max(1, int(round(args.images * 0.2)))
    # a baseline with no signal: most kept detections first (more objects, more chances to err)
    most = np.lexsort((np.array(names), -ranked.column("kept").to_numpy()))   # ties by name
    report["top_20%_most_detections_first"] = round(float(wrong[most][:k].mean()), 4)
    report["top_20%_by_one_signal"] = {}
    for name in SIGNALS:
        order = np.lexsort((np.arange(len(names)), -ranked.column(name).to_numpy()))
        report["top_20%_by_one_signal"][name] = round(float(wrong[order][:k].mean()), 4)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

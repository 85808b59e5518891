"""How exactly the label formats give back segpipe's masks, read by the tools' own code.

    .venv/bin/python bench/labels_roundtrip.py [--images 100] [--per-image 10] [--json OUT.json]
    .venv/bin/python bench/labels_roundtrip.py --run out/sample --photos samples  # a real run

Trained-like detections (``tests/synthetic.blob_rows``: smooth blobs of 8-300 px boxes, some
with holes, pasted by the encode stage; every 4th cut in two by a 4-pixel bar, as by an
occluding pole) are written as predictions/, then exported as COCO
(the reference masks), Label Studio brush and polygon tasks, and a YOLO dataset. Label
Studio brush masks are decoded by label-studio-sdk's ``decode_rle``, polygons put back in
pixels and filled by pycocotools; YOLO labels are read by Ultralytics' ``YOLODataset`` and
filled by its ``polygon2mask``. Prints IoU with the COCO mask per detection (min, share
exact) by kind of mask, and each export's time. ``--run OUTPUT --photos INPUT`` does the
same on a real run's predictions (random weights give noisy masks of many parts: the worst
case for formats that want one polygon an object).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np
from PIL import Image

from synthetic import blob_rows, write_predictions
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import ExportFormat, run_export


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def occlude(rows: list[dict], every: int) -> None:
    """Cut every ``every``-th mask in two with a 4-pixel vertical bar through its box's middle
    (an object behind a pole): trained models' masks of several parts look like this."""
    from pycocotools import mask as mask_utils

    k = 0
    for row in rows:
        for det in row["detections"]:
            k += 1
            if k % every or det["area"] < 50:
                continue
            rle = det["segmentation"]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            x, _, bw, _ = (int(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()}))
            mask[:, x + bw // 2 - 2:x + bw // 2 + 2] = 0
            cut = mask_utils.encode(np.asfortranarray(mask))
            det["segmentation"] = {"size": rle["size"], "counts": cut["counts"].decode()}
            det["area"] = int(mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--run", help="a segment OUTPUT to use instead of synthetic blobs")
    parser.add_argument("--photos", help="the INPUT that run read (for YOLO's image links)")
    args = parser.parse_args()
    import cv2
    from label_studio_sdk.converter.brush import decode_rle
    from pycocotools import mask as mask_utils

    h, w = 480, 640
    root = Path(tempfile.mkdtemp(prefix="labels-roundtrip-"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / ".ultralytics"))
    from test_labels import matched_ious, yolo_masks

    try:
        if args.run:
            shutil.copytree(args.run, root / "run")
            shutil.copytree(args.photos, root / "photos")
        else:
            rows = blob_rows(args.images, args.per_image, h, w, seed=11, smallest=8, largest=300)
            occlude(rows, every=4)
            write_predictions(root / "run", rows, rows_per_file=50)
            (root / "photos" / "blobs").mkdir(parents=True)
            for k in range(args.images):
                Image.new("RGB", (w, h)).save(root / "photos" / "blobs" / f"{k:04d}.jpg")
        options = ExportOptions(score_threshold=0.05)
        seconds = {}
        for name, fmt, opts in (("coco", ExportFormat(), options),
                                ("label-studio brush", ExportFormat("label-studio", "/data/local-files/?d="), options),
                                ("label-studio polygons", ExportFormat("label-studio", "/data/local-files/?d="),
                                 ExportOptions(score_threshold=0.05, polygons=True)),
                                ("yolo", ExportFormat("yolo", str(root / "photos"), 0.1, 0), options)):
            start = time.perf_counter()
            run_export(str(root / "run"), str(root / name.replace(" ", "-")), opts, export_format=fmt,
                                 shard_images=0)
            seconds[name] = round(time.perf_counter() - start, 3)
        coco = json.loads((root / "coco" / "instances.json").read_text())
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        sizes = {im["file_name"]: (im["height"], im["width"]) for im in coco["images"]}
        names = {c["id"]: c["name"] for c in coco["categories"]}
        reference: dict[str, list] = {name: [] for name in files.values()}
        classes: dict[str, list] = {name: [] for name in files.values()}
        for ann in coco["annotations"]:
            reference[files[ann["image_id"]]].append(mask_utils.decode(ann["segmentation"]).astype(bool))
            classes[files[ann["image_id"]]].append(names[ann["category_id"]])
        kinds = {}
        for masks in reference.values():
            for m in masks:
                parts = len(cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])
                holes = len(cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0]) - parts
                kinds[id(m)] = ("several parts" if parts > 1 else "one part, holes" if holes else "one part") + \
                    (", < 200 px" if m.sum() < 200 else ", >= 200 px")
        found: dict[str, dict[str, list]] = {}

        def note(fmt, mask, want):
            found.setdefault(fmt, {}).setdefault(kinds[id(want)], []).append(_iou(mask, want))

        for fmt in ("label-studio-brush", "label-studio-polygons"):
            for task in json.loads((root / fmt / "tasks.json").read_text()):
                want = reference[task["data"]["file_name"]]
                regions = task["predictions"][0]["result"]
                if fmt.endswith("brush"):
                    got = [decode_rle(r["value"]["rle"]).reshape(
                        r["original_height"], r["original_width"], 4)[:, :, 3] > 0 for r in regions]
                else:
                    by: dict[str, list] = {}
                    ih, iw = sizes[task["data"]["file_name"]]
                    for r in regions:
                        pts = np.asarray(r["value"]["points"]) * [iw / 100, ih / 100]
                        by.setdefault(r["id"].split("p")[0], []).append(pts.ravel().tolist())
                    got = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, ih, iw))).astype(bool)
                           for p in by.values()]
                for mask, ref in zip(got, want):
                    note(fmt, mask, ref)
        read_back = yolo_masks(root / "yolo", [c["name"] for c in coco["categories"]])
        for name, want in reference.items():
            for ref, iou in zip(want, matched_ious(want, classes[name], read_back.get(name, []))):
                found.setdefault("yolo", {}).setdefault(kinds[id(ref)], []).append(iou)
        report = {"source": args.run or "synthetic blobs (tests/synthetic.blob_rows, seed 11)",
                  "detections": sum(len(v) for v in reference.values()), "images": len(reference),
                  "export_seconds": seconds, "iou": {}}
        for fmt, by_kind in found.items():
            report["iou"][fmt] = {kind: {"n": len(v), "min": round(min(v), 4), "median": round(float(np.median(v)), 4),
                                         "exact": round(float(np.mean(np.array(v) == 1.0)), 4)}
                                  for kind, v in sorted(by_kind.items())}
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

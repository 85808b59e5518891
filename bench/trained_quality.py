"""segpipe's quality figures on a model that has learned something: the Mask R-CNN that
``bench/train_shapes.py`` trained on the shapes dataset, judged on its held-out split.

    .venv/bin/python bench/train_shapes.py          # prints the checkpoint and its sha256
    .venv/bin/python bench/trained_quality.py --weights CKPT --data DATA [--work DIR]
        [--only ap,review,precision,fp16,islands,soft,tiles,gallery] [--json OUT.json]

``DATA`` is the dataset folder the training used (``DATA/val``: held-out images and exact
ground truth). Every run goes through segpipe's own CLI on a local Ray (``segment``,
``eval``, ``review``, ``export``), the checkpoint loaded as any user's (``--weights CKPT
--categories shapes-categories.json``), at the training's size (``--min-size 320
--max-size 432``). Reports:

* ``ap``: ``segpipe eval``'s mask and box AP, and faster-coco-eval's on the same results when
  it is installed;
* ``review``: the share of images with a real mistake (a missed object, a false detection, a
  wrong class, a mask IoU < 0.8 with its match; detections scoring >= 0.5; counted by
  ``tests/synthetic.image_errors``) in the first 20%
  of ``segpipe review``'s queue, and the share of all such mistakes those images hold,
  against the whole set and 20% (a random order's expectations),
  lowest mean score first (how Label Studio and Labelbox sort by prediction score) and most
  detections first; and each of the queue's signals alone;
* ``precision``: a bf16 run against the fp32 run, detection by detection (same class, best
  box IoU): box corner shift in pixels and mask IoU (median, 5th percentile, min);
* ``fp16``: fp16 and bf16 against fp32 in one process (segpipe's predictor code,
  ``model.inference.predict_images``, the first ``--fp16-images`` held-out images, batch 2, 2
  threads), matched as in ``precision``, overall and by object size. fp16 runs on CPU's fp16
  kernels (segpipe runs fp16 on CUDA only; the bench swaps in CPU autocast at float16 and keeps
  segpipe's fp32 islands), so it measures the trained network in fp16, not a GPU's kernels;
* ``islands``: where bf16 loses against fp32, in one process (segpipe's predictor code,
  ``model.inference.predict_images``, the first ``--islands-images`` held-out images, batch
  2): segpipe's bf16 against bf16 with more of the network kept in fp32 (the RPN head and
  the RoI heads; then the FPN as well), each against fp32, matched as in ``precision``, with
  the seconds each took;
* ``soft``: ``export --mask-threshold T`` from the stored uint16 soft masks against a fresh
  ``segment --mask-threshold T``, T in 0.3 and 0.7: mask IoU per detection, share identical;
* ``gallery``: ``segpipe render`` and ``segpipe review --images`` of the held-out run, six
  images of each as ``docs/images/trained-gallery.jpg`` and ``trained-review.jpg``;
* ``tiles``: a 4×4 mosaic of held-out images at half size (objects at the training's scale)
  predicted whole (no resize) and with ``--tile 320``: how many of the whole run's confident
  detections the tiled run finds (same class, mask IoU >= 0.5), and their mask IoU, with
  those crossing a tile seam counted apart, and how many of the missed ones lie inside a
  larger detection of their class (what the tile merge's intersection over the smaller box
  glued them into).

The label formats' round trips on the trained masks: ``bench/labels_roundtrip.py --run
WORK/fp32 --photos DATA/val/images``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from bench import report_json  # noqa: E402
from parity import box_iou, decoded, mask_iou  # noqa: E402
from segpipe.review.signals import SIGNALS  # noqa: E402
from synthetic import image_errors  # noqa: E402

SIZE = ("--min-size", "320", "--max-size", "432")
THRESHOLD = 0.5     # the review's and the exports' default score threshold
MASK_OK = 0.8       # below this mask IoU with its match, a detection is a mistake


def segpipe(*args: str) -> str:
    quiet = ["--no-progress"] if args[0] != "eval" else []
    done = subprocess.run([sys.executable, "-m", "segpipe.cli", *args, *quiet],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"segpipe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def segment(images: Path, out: Path, weights: Path, *extra: str,
            size: tuple[str, ...] = SIZE) -> Path:
    """``segpipe segment`` with the trained checkpoint, unless ``out`` holds a finished run."""
    if not (out / "run.json").exists():
        segpipe("segment", str(images), str(out), "--weights", str(weights), "--categories",
                str(weights.parent / "shapes-categories.json"), *size, *extra)
    return out


def detections(run: Path) -> dict[str, list[dict]]:
    """Each image's detections (``file_name`` → rows of predictions/)."""
    table = pq.ParquetDataset(sorted(str(p) for p in (run / "predictions").glob("*.parquet"))
                              ).read(columns=["file_name", "detections"])
    return {name: dets or [] for name, dets in zip(table.column("file_name").to_pylist(),
                                                    table.column("detections").to_pylist())}


def ground_truth(data: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    coco = json.loads((data / "val" / "instances.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    truth: dict[str, list] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        truth[names[ann["image_id"]]].append((ann["category_id"], mask_utils.decode(
            ann["segmentation"]).astype(bool)))
    return truth


def ap_figures(run: Path, data: Path) -> dict:
    segpipe("eval", str(run), "--gt", str(data / "val" / "instances.json"), "--iou-type", "both")
    report = json.loads((run / "eval.json").read_text())
    figures = {"segpipe_eval": {t: report[t] for t in ("segm", "bbox")}}
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        figures["faster_coco_eval"] = "not installed"
        return figures
    gt = COCO(str(data / "val" / "instances.json"))
    ids = {image["file_name"]: image["id"] for image in gt.dataset["images"]}
    results = [{"image_id": ids[name], "category_id": d["category_id"], "score": d["score"],
                "bbox": d["bbox"], "segmentation": d["segmentation"]}
               for name, dets in detections(run).items() for d in dets]
    figures["faster_coco_eval"] = {}
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval_faster(gt, gt.loadRes(results), iou_type, print_function=lambda *_: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        figures["faster_coco_eval"][iou_type] = {"AP": round(float(evaluator.stats[0]), 4),
                                                 "AP50": round(float(evaluator.stats[1]), 4)}
    return figures


def review_figures(run: Path, data: Path, work: Path) -> dict:
    to = work / "review"
    if not (to / "review.jsonl").exists():
        segpipe("review", str(run), "--to", str(to))
    records = [json.loads(line) for line in (to / "review.jsonl").read_text().splitlines()]
    queue = [r["file_name"] for r in records]
    dets, truth = detections(run), ground_truth(data)
    found = {name: int(image_errors({"detections": dets[name]}, truth[name], THRESHOLD, MASK_OK))
             for name in dets}
    wrong = {name: found[name] > 0 for name in dets}
    k = max(1, round(0.2 * len(queue)))
    total = sum(found.values())

    def share(order: list[str]) -> float:
        return round(sum(wrong[name] for name in order[:k]) / k, 4)

    def caught(order: list[str]) -> float:
        return round(sum(found[name] for name in order[:k]) / total, 4)

    def mean_score(name: str) -> float:
        kept = [d["score"] for d in dets[name] if d["score"] >= THRESHOLD]
        return sum(kept) / len(kept) if kept else 1.0

    base = sum(wrong.values()) / len(wrong)
    orders = {
        "review queue": queue,
        "lowest mean score first": sorted(dets, key=mean_score),
        "most detections first": sorted(dets, key=lambda n: -sum(d["score"] >= THRESHOLD
                                                                  for d in dets[n])),
        **{f"{signal} alone": [r["file_name"] for r in sorted(records, key=lambda r: -r[signal])]
           for signal in SIGNALS},
    }
    return {"images": len(wrong), "with_mistakes": round(base, 4), "mistakes": total,
            "top_20%": {name: {"with_mistakes": share(order),
                               "over_random": round(share(order) / base, 3),
                               "share_of_all_mistakes": caught(order),
                               "mistakes_over_random": round(caught(order) / 0.2, 3)}
                        for name, order in orders.items()}}


def matched_pairs(a: dict[str, list[dict]], b: dict[str, list[dict]]):
    """Per detection of ``a`` scoring >= THRESHOLD: its best same-class box match in ``b``."""
    for name, dets in a.items():
        for det in dets:
            if det["score"] < THRESHOLD:
                continue
            candidates = [(box_iou(det["box"], o["box"]), k) for k, o in enumerate(b[name])
                          if o["category_id"] == det["category_id"]]
            best, k = max(candidates, default=(0.0, None))
            yield det, (b[name][k] if k is not None and best > 0.5 else None)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = np.array(values)
    return {"median": round(float(np.median(v)), 4), "p5": round(float(np.percentile(v, 5)), 4),
            "p95": round(float(np.percentile(v, 95)), 4), "min": round(float(v.min()), 4),
            "max": round(float(v.max()), 4), "count": len(values)}


def agreement(reference: dict[str, list[dict]], other: dict[str, list[dict]]
              ) -> tuple[list[float], list[float], list[int], int]:
    """For each detection of ``reference`` scoring >= THRESHOLD matched in ``other``
    (``matched_pairs``): the largest box corner shift in pixels, the mask IoU and the
    reference mask's area; and how many found no match."""
    shifts, ious, areas, unmatched = [], [], [], 0
    for det, match in matched_pairs(reference, other):
        if match is None:
            unmatched += 1
            continue
        shifts.append(float(np.abs(np.array(det["box"]) - np.array(match["box"])).max()))
        ious.append(mask_iou(decoded(det["segmentation"]), decoded(match["segmentation"])))
        areas.append(det["area"])
    return shifts, ious, areas, unmatched


def precision_figures(fp32: Path, images: Path, weights: Path, work: Path) -> dict:
    bf16 = segment(images, work / "bf16", weights, "--precision", "bf16")
    shifts, ious, _, unmatched = agreement(detections(fp32), detections(bf16))
    return {"bf16_vs_fp32": {"box_shift_px": percentiles(shifts), "mask_iou": percentiles(ious),
                             "fp32_detections_without_match": unmatched}}


#: bf16 with more of the network in fp32 than segpipe's islands (``model.precision``): the
#: modules run in fp32 on fp32 inputs, the rest under bf16 autocast.
ISLAND_VARIANTS = {"bf16 (segpipe's)": (),
                   "bf16, RPN head and RoI heads in fp32": ("rpn.head", "roi_heads"),
                   "bf16, FPN, RPN head and RoI heads in fp32": ("backbone.fpn", "rpn.head",
                                                                 "roi_heads")}


#: COCO's object sizes by mask area in pixels (small < 32², medium < 96²).
AREA_RANGES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf"))}


def _in_fp32(module) -> None:
    import torch

    from segpipe.model.precision import as_fp32

    forward = module.forward

    def fp32_forward(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(*as_fp32(args), **as_fp32(kwargs))
    module.forward = fp32_forward


def _predictor_runs(images: Path, weights: Path, count: int):
    """The first ``count`` held-out images and a function that runs them through segpipe's
    predictor code in one process (``model.inference.predict_images``, batch 2, 2 threads) at a
    precision, with some modules kept in fp32: ``run(precision, fp32_parts)`` gives the encoded
    detections per file name and the seconds the prediction took.

    ``fp16`` runs on CPU's fp16 kernels: segpipe itself runs fp16 on CUDA only
    (``model.precision.autocast`` refuses it elsewhere), so for the figure the bench swaps in
    CPU autocast at float16, with segpipe's fp32 islands as they are — the same network, in
    another device's kernels."""
    import contextlib
    import time

    import torch
    from PIL import Image

    from segpipe.encode.encoder import encode_detections
    from segpipe.model import precision as precision_module
    from segpipe.model.build import build_model, load_checkpoint
    from segpipe.model.inference import image_tensor, predict_images
    from segpipe.model.precision import prepare_model
    from segpipe.model.spec import ModelSpec

    torch.set_num_threads(2)
    spec = ModelSpec("maskrcnn_resnet50_fpn", int(SIZE[1]), int(SIZE[3]), 0.05, 0.5, 100, 1000,
                     num_classes=5)
    state = load_checkpoint(weights)
    files = sorted(images.iterdir())[:count]
    pixels = [np.asarray(Image.open(f).convert("RGB")) for f in files]

    @contextlib.contextmanager
    def cpu_fp16_allowed(precision: str):
        segpipe_autocast = precision_module.autocast
        if precision == "fp16":
            precision_module.autocast = lambda device, _: torch.autocast(device.type,
                                                                         dtype=torch.float16)
        try:
            yield
        finally:
            precision_module.autocast = segpipe_autocast

    def run(precision: str, fp32_parts: tuple[str, ...] = ()) -> tuple[dict, float]:
        model = build_model(spec)
        model.load_state_dict(state)
        prepare_model(model.eval(), torch.device("cpu"), precision)
        for name in fp32_parts:
            _in_fp32(model.get_submodule(name))
        found, start = [], time.perf_counter()
        with cpu_fp16_allowed(precision):
            for at in range(0, len(pixels), 2):
                batch = [image_tensor(p, torch.device("cpu")) for p in pixels[at:at + 2]]
                found += predict_images(model, batch, precision)
        seconds = time.perf_counter() - start
        return {f.name: encode_detections(det, *p.shape[:2], 0.5, keep_soft_masks=False)
                for f, p, det in zip(files, pixels, found)}, seconds

    return files, run


def _against(reference: dict, low: dict, seconds: float) -> dict:
    """``low``'s detections against ``reference``'s (``agreement``), overall and by size."""
    shifts, ious, areas, unmatched = agreement(reference, low)
    by_area = {size: percentiles([iou for iou, area in zip(ious, areas) if least <= area < most])
               for size, (least, most) in AREA_RANGES.items()}
    return {"seconds": round(seconds, 1), "box_shift_px": percentiles(shifts),
            "mask_iou": percentiles(ious), "mask_iou_by_area": by_area,
            "fp32_detections_without_match": unmatched}


def islands_figures(images: Path, weights: Path, count: int) -> dict:
    files, run = _predictor_runs(images, weights, count)
    reference, fp32_seconds = run("fp32")
    figures: dict = {"images": len(files), "fp32_seconds": round(fp32_seconds, 1)}
    for name, parts in ISLAND_VARIANTS.items():
        figures[name] = _against(reference, *run("bf16", parts))
    return figures


def low_precision_figures(images: Path, weights: Path, count: int) -> dict:
    """fp16 (on CPU's fp16 kernels, see ``_predictor_runs``) and bf16 against fp32, all three
    through the same one-process predictor code on the same images."""
    files, run = _predictor_runs(images, weights, count)
    reference, fp32_seconds = run("fp32")
    figures: dict = {"images": len(files), "fp32_seconds": round(fp32_seconds, 1),
                     "fp32_detections_at_threshold": sum(
                         d["score"] >= THRESHOLD for dets in reference.values() for d in dets)}
    for precision in ("fp16", "bf16"):
        figures[precision] = _against(reference, *run(precision))
    return figures


def soft_mask_figures(fp32: Path, images: Path, weights: Path, work: Path) -> dict:
    figures = {}
    for threshold in (0.3, 0.7):
        fresh = segment(images, work / f"fresh-{threshold}", weights, "--mask-threshold",
                        str(threshold))
        exported = work / f"export-{threshold}"
        if not exported.exists():
            segpipe("export", str(fp32), "--to", str(exported), "--mask-threshold",
                    str(threshold), "--score-threshold", "0.05")
        shards = sorted(exported.glob("**/instances*.json"))
        anns = [a for shard in shards for a in json.loads(shard.read_text())["annotations"]]
        names = {i["id"]: i["file_name"] for s in shards for i in json.loads(s.read_text())["images"]}
        by_key = {(names[a["image_id"]], a["category_id"], round(a["score"], 7)): a for a in anns}
        ious = []
        for name, dets in detections(fresh).items():
            for det in dets:
                ann = by_key.get((name, det["category_id"], round(det["score"], 7)))
                if ann is None or "segmentation" not in ann:
                    continue
                ious.append(mask_iou(decoded(det["segmentation"]), decoded(ann["segmentation"])))
        figures[str(threshold)] = {**percentiles(ious), "identical": round(
            float(np.mean(np.array(ious) == 1.0)), 4) if ious else None}
    return figures


def tile_figures(data: Path, weights: Path, work: Path) -> dict:
    from PIL import Image
    folder = work / "mosaic"
    folder.mkdir(exist_ok=True)
    tiles = sorted((data / "val" / "images").glob("*.png"))
    for m in range(4):
        mosaic = Image.new("RGB", (1280, 960))
        for k, path in enumerate(tiles[16 * m:16 * m + 16]):
            part = Image.open(path).convert("RGB").resize((320, 240), Image.BILINEAR)
            mosaic.paste(part, ((k % 4) * 320, (k // 4) * 240))
        mosaic.save(folder / f"mosaic-{m}.png")
    native = ("--min-size", "960", "--max-size", "1280")
    whole = segment(folder, work / "mosaic-whole", weights, size=native)
    tiled = segment(folder, work / "mosaic-tiled", weights, "--tile", "320", size=native)
    found: dict[str, list[float]] = {"inside": [], "seam": []}
    missed = {"inside": 0, "seam": 0}
    nested = {"inside": 0, "seam": 0}
    step = int(320 * (1 - 0.2))
    tiled_dets = detections(tiled)
    for name, dets in detections(whole).items():
        for det in dets:
            if det["score"] < THRESHOLD:
                continue
            x, y, w, h = det["bbox"]
            crosses = any(x < e < x + w for e in range(320, 1280, step)) or \
                any(y < e < y + h for e in range(320, 960, step))
            where = "seam" if crosses else "inside"
            mask = decoded(det["segmentation"])
            same = [o for o in tiled_dets[name]
                    if o["category_id"] == det["category_id"] and o["score"] >= 0.3]
            best = max((mask_iou(mask, decoded(o["segmentation"])) for o in same), default=0.0)
            if best >= 0.5:
                found[where].append(best)
                continue
            missed[where] += 1
            nested[where] += any(_over_smaller(det["bbox"], o["bbox"]) >= 0.5
                                 and o["area"] > det["area"] for o in same)
    return {where: {"found": len(found[where]), "missed": missed[where],
                    "missed_inside_a_larger_same_class_detection": nested[where],
                    "mask_iou": percentiles(found[where])} for where in found}


def _over_smaller(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller of two COCO ``[x, y, w, h]`` boxes (the tile merge's IOS)."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / max(1e-9, min(a[2] * a[3], b[2] * b[3]))


def contact_sheet(paths: list[Path], out: Path, columns: int = 3, width: int = 1280) -> None:
    """``paths`` side by side, ``columns`` a row, as one JPEG ``width`` px wide (each row
    as tall as its tallest picture)."""
    from PIL import Image
    cell = width // columns
    tiles = [Image.open(p).convert("RGB") for p in paths]
    tiles = [t.resize((cell, round(t.height * cell / t.width)), Image.LANCZOS) for t in tiles]
    rows = [tiles[k:k + columns] for k in range(0, len(tiles), columns)]
    sheet = Image.new("RGB", (width, sum(max(t.height for t in row) for row in rows)), "white")
    top = 0
    for row in rows:
        for k, tile in enumerate(row):
            sheet.paste(tile, (k * cell, top))
        top += max(t.height for t in row)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=82)


def gallery_figures(run: Path, data: Path, work: Path, docs: Path) -> dict:
    """``segpipe render`` of the held-out run and ``segpipe review --images`` of its queue,
    six of each as one picture in ``docs``."""
    from PIL import Image
    images = data / "val" / "images"
    gallery = work / "gallery"
    if not (gallery / "index.html").exists():
        segpipe("render", str(run), "--images", str(images), "--to", str(gallery),
                "--limit", "12")
    review = work / "review-gallery"
    if not (review / "review.jsonl").exists():
        segpipe("review", str(run), "--to", str(review), "--top", "6", "--images", str(images))
    ranked = [json.loads(line)["file_name"] for line in
              (review / "review.jsonl").read_text().splitlines()[:6]]
    drawn = {p.stem: p for p in (review / "gallery").glob("**/*.jpg")}
    landscape = [p for p in sorted((gallery / "images").glob("*.jpg"))
                 if Image.open(p).width > Image.open(p).height]
    contact_sheet(landscape[:6], docs / "trained-gallery.jpg")
    contact_sheet([drawn[Path(name).stem] for name in ranked if Path(name).stem in drawn],
                  docs / "trained-review.jpg")
    return {"gallery": str(docs / "trained-gallery.jpg"), "review": str(docs / "trained-review.jpg"),
            "review_top": ranked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--only", default="ap,review,precision,fp16,islands,soft,tiles,gallery")
    parser.add_argument("--islands-images", type=int, default=40)
    parser.add_argument("--fp16-images", type=int, default=200)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "images",
                        help="where the gallery pictures go")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="segpipe-trained-"))
    work.mkdir(parents=True, exist_ok=True)
    images = args.data / "val" / "images"
    import hashlib
    result: dict = {"weights": args.weights.name,
                    "sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest(),
                    "work": str(work)}
    wanted = args.only.split(",")
    if "islands" in wanted:
        result["islands"] = islands_figures(images, args.weights, args.islands_images)
    if "fp16" in wanted:
        result["fp16"] = low_precision_figures(images, args.weights, args.fp16_images)
    if set(wanted) - {"islands", "fp16"}:
        fp32 = segment(images, work / "fp32", args.weights)
    if "ap" in wanted:
        result["ap"] = ap_figures(fp32, args.data)
    if "review" in wanted:
        result["review"] = review_figures(fp32, args.data, work)
    if "precision" in wanted:
        result["precision"] = precision_figures(fp32, images, args.weights, work)
    if "soft" in wanted:
        result["soft_masks_uint16"] = soft_mask_figures(fp32, images, args.weights, work)
    if "tiles" in wanted:
        result["tiles"] = tile_figures(args.data, args.weights, work)
    if "gallery" in wanted:
        result["gallery"] = gallery_figures(fp32, args.data, work, args.docs)
    report_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

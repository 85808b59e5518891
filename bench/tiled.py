"""Tiled inference at full size: agreement with SAHI and images/s of tiled vs untiled runs.

    python bench/tiled.py [--width 4000 --height 3000] [--tile 512 --overlap 0.2]
        [--arch maskrcnn_resnet50_fpn] [--full-pass] [--no-sahi] [--no-record]

One collage of the sample photos (``skimage.data``, upscaled 2× so that objects are large)
at ``--width × --height``; seeded random weights with torchvision's default settings
(min_size 800, max_size 1333, 1000 proposals, 100 detections per image or tile). Times, on
this machine's CPU threads:

* segpipe tiled: the predictor actor class (tiles, ``--batch-size`` per forward, merge) and
  the encode stage (exact full-resolution RLE), as Ray Data calls them; with segpipe's
  defaults (seams joined) and with ``join_seams`` off (SAHI's merge exactly);
* segpipe untiled: the same image predicted whole (resized to min_size/max_size), encoded;
* SAHI 0.12 ``get_sliced_prediction`` with the same slices, overlap and merge
  (``tests/sahi_reference.py`` says how its settings are matched and what differs by design).

Prints and appends to docs/benchmarks.md the agreement (``sahi_reference.agreement``) and
the seconds per image of each.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import replace
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sahi_reference as ref  # noqa: E402
from images import photo  # noqa: E402
from segpipe.config import SegmentConfig, tile_overlap_pixels
from segpipe.model.spec import TileSettings
from segpipe.model.build import ModelSpec, build_model


def collage(height: int, width: int) -> np.ndarray:
    """The sample photos at 2×, side by side and row after row, filling the image."""
    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle"]
    image = np.zeros((height, width, 3), np.uint8)
    y = 0
    k = 0
    while y < height:
        x, row = 0, 0
        while x < width:
            part = photo(names[k % len(names)], 2.0)
            k += 1
            h, w = min(part.shape[0], height - y), min(part.shape[1], width - x)
            image[y:y + h, x:x + w] = part[:h, :w]
            x += w
            row = max(row, h)
        y += row
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--full-pass", action="store_true")
    parser.add_argument("--mask-head", choices=("random", "box"), default="box",
                        help="random: the noise masks of random weights; box: a head that "
                             "predicts its whole box (well-formed masks, as trained heads give)")
    parser.add_argument("--no-sahi", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    config = SegmentConfig(arch=args.arch)
    spec = ModelSpec.from_config(config)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    if spec.has_masks and args.mask_head == "box":
        state = ref.box_mask_head(state)
    image = collage(args.height, args.width)
    tiling = TileSettings(args.tile, tile_overlap_pixels(args.tile, args.overlap),
                          args.full_pass)
    from segpipe.model.tiles import image_views

    tiles = len(image_views(args.height, args.width, tiling))
    seconds = {}
    start = time.perf_counter()
    ours = ref.segpipe_tiled(spec, state, image, tiling, args.batch_size)
    seconds["segpipe_tiled"] = time.perf_counter() - start
    as_sahi = replace(tiling, join_seams=False)
    start = time.perf_counter()
    ours_as_sahi = ref.segpipe_tiled(spec, state, image, as_sahi, args.batch_size)
    seconds["segpipe_tiled_no_seams"] = time.perf_counter() - start
    start = time.perf_counter()
    whole = ref.segpipe_tiled(spec, state, image, None, args.batch_size)
    seconds["segpipe_untiled"] = time.perf_counter() - start
    result = {"date": dt.date.today().isoformat(), "cpu": platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "image": [args.width, args.height],
              "tile": args.tile, "overlap": tiling.overlap, "full_pass": args.full_pass,
              "arch": args.arch, "mask_head": args.mask_head if spec.has_masks else None,
              "views": tiles, "batch_size": args.batch_size,
              "detections": {"segpipe_tiled": len(ours),
                             "segpipe_tiled_no_seams": len(ours_as_sahi),
                             "segpipe_untiled": len(whole)}}
    if not args.no_sahi:
        start = time.perf_counter()
        theirs = ref.sahi_sliced(spec, state, image, tiling, args.overlap)
        seconds["sahi_sliced"] = time.perf_counter() - start
        comparable = [f for f in ours if ref.has_polygon(f)]
        result["agreement"] = ref.agreement(theirs, comparable).summary()
        result["agreement_no_seams"] = ref.agreement(
            theirs, [f for f in ours_as_sahi if ref.has_polygon(f)]).summary()
        result["detections"]["without_polygon"] = len(ours) - len(comparable)
        if spec.has_masks:   # segpipe's detections as SAHI holds them, merged: what is left
            held = ref.segpipe_as_sahi_holds_it(spec, state, image, as_sahi, args.batch_size)
            result["agreement_as_sahi_holds_them"] = ref.agreement(theirs, held).summary()
        if spec.has_masks:   # SAHI on the model's boxes: its merge exactly, against no seams
            start = time.perf_counter()
            boxes = ref.sahi_sliced(spec, state, image, tiling, args.overlap, masks=False)
            seconds["sahi_sliced_model_boxes"] = time.perf_counter() - start
            result["agreement_model_boxes_no_seams"] = ref.agreement(
                boxes, ours_as_sahi, model_boxes=True).summary()
    result["seconds_per_image"] = {k: round(v, 1) for k, v in seconds.items()}
    result["images_per_s"] = {k: round(1 / v, 4) for k, v in seconds.items()}
    print(json.dumps(result, indent=1))
    if not args.no_record:
        record(result)


def record(result: dict) -> None:
    lines = [f"\n### Tiled inference ({result['date']}, {result['cpu']}, {result['threads']} "
             f"threads, `bench/tiled.py`)\n",
             f"{result['image'][0]}×{result['image'][1]} px collage, {result['arch']}, seeded "
             f"random weights (mask head: {result['mask_head']}), tile {result['tile']} px, "
             f"overlap {result['overlap']} px, full pass {'on' if result['full_pass'] else 'off'}: "
             f"{result['views']} views, "
             f"batch {result['batch_size']}.\n",
             "| run | s/image | images/s | detections |", "| --- | --- | --- | --- |"]
    for name, s in result["seconds_per_image"].items():
        count = result["detections"].get(name, "")
        if name == "sahi_sliced" and "agreement" in result:
            count = result["agreement"]["sahi"]
        if name == "sahi_sliced_model_boxes":
            count = result["agreement_model_boxes_no_seams"]["sahi"]
        lines.append(f"| {name} | {s} | {result['images_per_s'][name]} | {count} |")
    if "agreement" in result:
        lines.append(f"\nsegpipe detections without a polygon (SAHI cannot hold them): "
                     f"{result['detections']['without_polygon']}. Agreement with SAHI "
                     "(`sahi_reference.agreement`):\n")
        for key in ("agreement", "agreement_no_seams", "agreement_as_sahi_holds_them",
                    "agreement_model_boxes_no_seams"):
            if key in result:
                lines.append(f"- {key}: `{json.dumps(result[key])}`")
        lines.append("")
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""BENCH INSTRUMENT: a seeded synthetic instance-segmentation dataset with exact COCO ground truth.

    .venv/bin/python bench/shapes.py --out DIR [--train 2000] [--val 200] [--width 640 --height 480]
        [--seed 0]

Writes ``DIR/train`` and ``DIR/val``, each ``images/*.png`` (lossless, so the ground truth is
exact to the pixel) and ``instances.json`` (COCO, one RLE per instance, ``iscrowd`` 0).

Four classes of shapes, each a test of its own for a mask head: ``ring`` (an annulus: a hole),
``triangle`` (sharp corners), ``cross`` (thin arms) and ``ellipse`` (smooth, elongated). Their
sizes are log-uniform from 10 to 400 px, on crops of scikit-image's real photos. Shapes drawn
later occlude earlier ones (the earlier instance keeps only what shows), and in half the
images 1-3 grey bars, which are not objects, cross the picture and cut what they cover into
several parts. Each image is made from its own seed (``seed``, split, index), so any image can
be made again alone and a larger set starts with the smaller one.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ring", "triangle", "cross", "ellipse")
SPLITS = {"train": 0, "val": 1}
#: Shape sizes (the longer side of the unoccluded shape), log-uniform.
MIN_SIZE, MAX_SIZE = 10, 400
#: Instances whose visible part is smaller than this many pixels are not instances (and not drawn).
MIN_VISIBLE_AREA = 16
#: scikit-image's colour photos used as backgrounds.
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "retina",
               "hubble_deep_field", "immunohistochemistry", "colorwheel", "logo")


@dataclass
class ShapesImage:
    """One generated image and its instances (``masks[k]``: H×W bool, the visible part)."""
    pixels: np.ndarray
    labels: list[int]
    masks: list[np.ndarray]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from skimage import data
    photos = []
    for name in BACKGROUNDS:
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:   # a photo missing from this scikit-image: the others serve
            continue
        if image.ndim == 3 and image.shape[2] >= 3 and min(image.shape[:2]) >= 256:
            photos.append(np.ascontiguousarray(image[..., :3]))
    return tuple(photos)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.4, 1.0)
    ch, cw = max(16, int(ph * scale)), max(16, int(pw * scale))
    y, x = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(crop)
    return pixels[:, ::-1].copy() if rng.random() < 0.5 else pixels.copy()


def _polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, bool)


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float,
                    n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return _rotated(np.stack([rx * np.cos(t), ry * np.sin(t)], 1), cx, cy, angle)


def _rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def shape_mask(label: int, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """The full (unoccluded) mask of one shape of class ``label`` (1-based), placed at random."""
    size = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
    size = min(size, 0.9 * min(width, height))
    r = size / 2
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label - 1]
    if name == "ring":
        aspect = rng.uniform(0.7, 1.0)
        outer = _polygon(_ellipse_points(cx, cy, r, r * aspect, angle), width, height)
        hole = rng.uniform(0.45, 0.65)
        inner = _polygon(_ellipse_points(cx, cy, r * hole, r * aspect * hole, angle), width, height)
        return outer & ~inner
    if name == "triangle":
        corners = np.array([[r * math.cos(a), r * math.sin(a)] for a in
                            (0, 2.1 + rng.uniform(-0.3, 0.3), 4.2 + rng.uniform(-0.3, 0.3))])
        return _polygon(_rotated(corners, cx, cy, angle), width, height)
    if name == "cross":
        arm = r * rng.uniform(0.18, 0.3)
        bar = np.array([[-r, -arm], [r, -arm], [r, arm], [-r, arm]])
        return (_polygon(_rotated(bar, cx, cy, angle), width, height)
                | _polygon(_rotated(bar, cx, cy, angle + math.pi / 2), width, height))
    aspect = rng.uniform(0.3, 0.7)
    return _polygon(_ellipse_points(cx, cy, r, r * aspect, angle), width, height)


def _bar_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    thickness = int(rng.integers(4, 17))
    if rng.random() < 0.5:
        y0, y1 = rng.uniform(0, height, 2)
        ends = [(-10, y0), (width + 10, y1)]
    else:
        x0, x1 = rng.uniform(0, width, 2)
        ends = [(x0, -10), (x1, height + 10)]
    ImageDraw.Draw(canvas).line(ends, fill=1, width=thickness)
    return np.asarray(canvas, bool)


def _paint(pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` with a saturated colour, a light gradient and noise."""
    hue = rng.uniform(0, 1)
    base = np.array([_hue_channel(hue, k) for k in (0, 1, 2)]) * rng.uniform(150, 255)
    base = base + rng.uniform(0, 60)
    ys, xs = np.nonzero(mask)
    shade = 1 + 0.25 * ((xs - xs.mean()) / max(int(np.ptp(xs)), 1) if rng.random() < 0.5 else
                        (ys - ys.mean()) / max(int(np.ptp(ys)), 1))
    noise = rng.normal(0, 8, (len(ys), 3))
    pixels[ys, xs] = np.clip(base[None] * shade[:, None] + noise, 0, 255).astype(np.uint8)


def _hue_channel(hue: float, channel: int) -> float:
    """The RGB channel (0-2) of a fully saturated colour of ``hue`` in [0, 1)."""
    offset = (0.0, 2 / 3, 1 / 3)[channel]
    return max(0.0, min(1.0, abs(((hue + offset) % 1) * 6 - 3) - 1))


def make_image(seed: int, split: str, index: int, width: int = 640,
               height: int = 480) -> ShapesImage:
    """Image ``index`` of ``split``: its pixels and its instances' visible masks."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    if rng.random() < 0.25:
        width, height = height, width           # a portrait image now and then
    pixels = _background(rng, width, height)
    labels: list[int] = []
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(3, 13))):
        label = int(rng.integers(1, len(CLASSES) + 1))
        mask = shape_mask(label, rng, width, height)
        if not mask.any():
            continue
        for earlier in masks:
            earlier &= ~mask
        _paint(pixels, mask, rng)
        labels.append(label)
        masks.append(mask)
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            bar = _bar_mask(rng, width, height)
            grey = rng.uniform(60, 200)
            pixels[bar] = np.clip(grey + rng.normal(0, 4, (int(bar.sum()), 3)), 0, 255
                                  ).astype(np.uint8)
            for mask in masks:
                mask &= ~bar
    kept = [(label, mask) for label, mask in zip(labels, masks)
            if mask.sum() >= MIN_VISIBLE_AREA]
    return ShapesImage(pixels, [k[0] for k in kept], [k[1] for k in kept])


def coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def write_split(out: Path, split: str, count: int, seed: int = 0, width: int = 640,
                height: int = 480) -> Path:
    """Write ``count`` images of ``split`` under ``out/split``; returns its instances.json."""
    from pycocotools import mask as mask_utils
    folder = out / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        made = make_image(seed, split, index, width, height)
        name = f"{split}_{index:06d}.png"
        Image.fromarray(made.pixels).save(folder / "images" / name)
        h, w = made.pixels.shape[:2]
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for label, mask in zip(made.labels, made.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                "segmentation": rle, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": coco_categories()}))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, count in (("train", args.train), ("val", args.val)):
        path = write_split(args.out, split, count, args.seed, args.width, args.height)
        print(f"{split}: {count} images, {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

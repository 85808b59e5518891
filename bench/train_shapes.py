"""BENCH INSTRUMENT: train torchvision's Mask R-CNN on the shapes dataset (``bench/shapes.py``), so
that segpipe's quality figures can be measured on a model that has learned something.

    .venv/bin/python bench/train_shapes.py [--images 2000] [--iterations 2600] [--batch-size 2]
        [--min-size 320] [--max-size 432] [--lr 3e-4] [--precision bf16|fp32] [--seed 0]
        [--cache DIR]

No pretrained weights can be had on these machines, so the whole ResNet-50-FPN Mask R-CNN
(``maskrcnn_resnet50_fpn``, all layers trainable, BatchNorm) learns from its seeded random
start: AdamW with a linear warm-up and a cosine decay, horizontal flips, at ``--min-size``,
the forward under bf16 autocast by default (fp32 master weights; 1.35 s against 1.8 s a batch
of two on the 2-core AMD EPYC, docs/benchmarks.md).
The dataset is generated into the cache when missing. The checkpoint is a plain state dict
saved outside the repository, in ``--cache`` (default ``~/.cache/segpipe-bench``), named by its
sha256 (``maskrcnn-shapes-<sha12>.pt``), with ``shapes-categories.json`` beside it and a log of
the losses (``<name>.log.json``). segpipe loads it as any user's checkpoint:

    segpipe segment VAL/images OUT --weights CKPT --categories shapes-categories.json \
        --min-size 320 --max-size 432
    segpipe eval OUT --gt VAL/instances.json

Prints the checkpoint's path and sha256 last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import shapes  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("SEGPIPE_BENCH_CACHE", Path.home() / ".cache" / "segpipe-bench"))


class ShapesTrainSet:
    """The ``train`` split as torchvision's detection targets (boxes from the exact masks)."""

    def __init__(self, split_dir: Path):
        from pycocotools import mask as mask_utils
        coco = json.loads((split_dir / "instances.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.items = [(split_dir / "images" / image["file_name"], by_image.get(image["id"], []))
                      for image in coco["images"]]
        self._decode = mask_utils.decode

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        path, anns = self.items[index]
        pixels = np.asarray(Image.open(path).convert("RGB"))
        height, width = pixels.shape[:2]
        masks = (np.stack([self._decode(a["segmentation"]) for a in anns]) if anns
                 else np.zeros((0, height, width), np.uint8))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
        if flip:
            pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div(255)
        target = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes)),
                  "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                  "masks": torch.from_numpy(np.ascontiguousarray(masks))}
        return image, target


def build_trainee(min_size: int, max_size: int, seed: int) -> torch.nn.Module:
    """torchvision's Mask R-CNN for the shapes' classes, seeded (without pretrained weights
    torchvision trains every layer, BatchNorm included)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(seed)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                 num_classes=len(shapes.CLASSES) + 1, min_size=min_size,
                                 max_size=max_size, box_batch_size_per_image=128)


def learning_rate(step: int, iterations: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, iterations - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(data: Path, iterations: int, batch_size: int, min_size: int, max_size: int,
          lr: float, seed: int, precision: str = "bf16", log_every: int = 20) -> tuple[torch.nn.Module, list[dict]]:
    """Train on ``data/train``; returns the model and the logged mean losses."""
    dataset = ShapesTrainSet(data / "train")
    model = build_trainee(min_size, max_size, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    warmup = min(100, max(1, iterations // 10))
    log, window, started = [], [], time.perf_counter()
    order = rng.permutation(len(dataset))
    cursor = 0
    for step in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, iterations, lr, warmup)
        images, targets = [], []
        for _ in range(batch_size):
            if cursor == len(order):
                order, cursor = rng.permutation(len(dataset)), 0
            image, target = dataset.sample(int(order[cursor]), bool(rng.random() < 0.5))
            cursor += 1
            images.append(image)
            targets.append(target)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = model(images, targets)
        total = sum(loss.float() for loss in losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        window.append({"loss": total.item(), **{k: v.item() for k, v in losses.items()}})
        if (step + 1) % log_every == 0 or step + 1 == iterations:
            entry = {key: sum(w[key] for w in window) / len(window) for key in window[0]}
            entry.update(step=step + 1, seconds=round(time.perf_counter() - started, 1))
            log.append(entry)
            window = []
            print(f"step {step + 1}/{iterations}  loss {entry['loss']:.3f}  "
                  f"mask {entry['loss_mask']:.3f}  {entry['seconds']:.0f} s", flush=True)
    return model.eval(), log


def save_checkpoint(model: torch.nn.Module, cache: Path, log: list[dict],
                    settings: dict) -> tuple[Path, str]:
    """Save the state dict as ``maskrcnn-shapes-<sha12>.pt`` in ``cache`` (atomically), with
    the categories file and the loss log beside it; returns its path and sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".maskrcnn-shapes-{os.getpid()}.partial"
    torch.save(model.state_dict(), partial)
    sha256 = hashlib.sha256(partial.read_bytes()).hexdigest()
    path = cache / f"maskrcnn-shapes-{sha256[:12]}.pt"
    os.replace(partial, path)
    (cache / "shapes-categories.json").write_text(json.dumps(shapes.coco_categories()))
    path.with_suffix(".log.json").write_text(json.dumps(
        {"sha256": sha256, "settings": settings, "losses": log}, indent=1))
    return path, sha256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="held-out images")
    parser.add_argument("--iterations", type=int, default=2600)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=432)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.cache / f"shapes-seed{args.seed}-{args.images}-{args.val}"
    if not (data / "val" / "instances.json").exists():
        for split, count in (("train", args.images), ("val", args.val)):
            shapes.write_split(data, split, count, args.seed)
    print(f"dataset {data}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("cache", "threads")}
    model, log = train(data, args.iterations, args.batch_size, args.min_size, args.max_size,
                       args.lr, args.seed, args.precision)
    path, sha256 = save_checkpoint(model, args.cache, log, settings)
    print(f"checkpoint {path}\nsha256 {sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints of the optional model families, built here from the libraries' own configs with
seeded random weights (nothing downloads), made to give varied detections on real photos.

Random weights alone give the same detections for every image (fresh BatchNorm statistics
drown the input) with near-tied scores: BatchNorm statistics are taken from the sample photos
and the class biases spread so that each class keeps its top ~0.5% of places.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from images import photo

CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def yolo_checkpoint(path: Path, model_yaml: str = "yolo11n-seg.yaml", classes: int = 3,
                    seed: int = 0, image_size: int = 320, names=None) -> Path:
    """An Ultralytics checkpoint of ``model_yaml`` (as its trainer saves one: the model
    under ``model``, ``train_args`` with the task and input size)."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    segment = "-seg" in model_yaml
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (SegmentationModel if segment else DetectionModel)(model_yaml, nc=classes, verbose=False)
        letterbox = LetterBox(image_size, auto=False, stride=32)
        pixels = np.stack([letterbox(image=photo(name)) for name in CALIBRATION_PHOTOS])
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None   # a plain average over the calibration batch
        model.train()
        with torch.no_grad():
            model(batch)
        model.eval()
        head = model.model[-1]
        outputs: list = []
        hooks = [seq[-1].register_forward_hook(lambda m, i, o: outputs.append(o)) for seq in head.cv3]
        with torch.no_grad():
            model(batch)
        for hook in hooks:
            hook.remove()
        spread = torch.Generator().manual_seed(seed)
        for seq, logits in zip(head.cv3, outputs):
            top = torch.quantile(logits.transpose(0, 1).reshape(classes, -1), 0.995, dim=1)
            target = torch.logit(torch.tensor(0.3)) + 0.5 * torch.randn(classes, generator=spread)
            seq[-1].bias.data += target - top
    model.names = dict(enumerate(names or [f"thing_{k}" for k in range(classes)]))
    torch.save({"model": model, "train_args": {"task": "segment" if segment else "detect",
                                               "imgsz": image_size}}, path)
    return path

"""torchvision's R-CNN family (Mask R-CNN v1 and v2, Faster R-CNN) behind the model seam
(``families``): its weights resolved in the driver, its detector in the predictor actors.

The detector is torchvision's own model (``build``), made precision-safe (``precision``) and
run a batch at a time (``inference``): each image's detections are those ``model([image])``
gives, bit for bit in fp32. On GPUs its RPN and box head post-process the whole batch at once
(``batched_postprocess``: the same arithmetic, one NMS per stage instead of one per image).
Its soft masks are the mask head's M×M probabilities over each box (``MASK_FRAME`` None),
pasted as torchvision pastes them (``encode.paste``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import numpy as np
import torch

from segpipe.config import ConfigError
from segpipe.model import batched_postprocess
from segpipe.model.build import (
    build_loaded_model,
    build_model,
    check_fits,
    checkpoint_classes,
    load_checkpoint,
    read_checkpoint_bytes,
    state_dict_sha256,
)
from segpipe.model.categories import Category, CategoryError, table_for, unnamed_classes_warning
from segpipe.model.detections import ImageDetections
from segpipe.model.inference import image_tensor, predict_images
from segpipe.model.precision import prepare_model
from segpipe.model.resolved import ResolvedWeights
from segpipe.model.spec import ModelSpec
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE, WeightsSource, check_hash, fetch

#: The soft masks are the box-relative M×M grid of the mask head.
MASK_FRAME = None


def resolve(source: WeightsSource, spec: ModelSpec, seed: int = 0,
            categories: Optional[tuple[Category, ...]] = None,
            show_progress: bool = False) -> ResolvedWeights:
    """Turn ``source`` into a state dict, the spec it fits and its categories.

    Raises ``ConfigError`` when a file is missing, unreadable, of another architecture, or has
    another number of classes than ``categories`` names; when pretrained weights are neither
    cached nor downloadable.
    """
    if source.kind == "random":
        num_classes = len(categories) + 1 if categories is not None else spec.num_classes
        spec = dataclasses.replace(spec, num_classes=num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = build_model(spec).state_dict()
        sha256 = state_dict_sha256(state)
    else:
        fetch(source, show_progress=show_progress)
        assert source.path is not None
        data = read_checkpoint_bytes(source.path)   # hashed and loaded from the same bytes
        sha256 = hashlib.sha256(data).hexdigest()
        if source.url is not None:
            check_hash(source.path, sha256)
        state = load_checkpoint(source.path, data)
        spec = dataclasses.replace(spec, num_classes=checkpoint_classes(state, spec.arch, source.name))
        check_fits(state, spec, source.name)
    try:
        table = table_for(spec.num_classes, categories)
    except CategoryError as exc:
        raise ConfigError(f"{exc} (weights {source.name})") from None
    warnings = [RANDOM_WEIGHTS_NOTE] if source.kind == "random" else []
    stored = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                     if v.is_floating_point() and v.dtype != torch.float32})
    if stored:
        warnings.append(f"the checkpoint stores its weights as {', '.join(stored)}: they are "
                        "widened to float32 for the model, and what was lost when they were "
                        "saved stays lost (predictions may differ from the float32 original)")
    unnamed = unnamed_classes_warning(table)
    if unnamed:
        warnings.append(unnamed)
    return ResolvedWeights(source.kind, source.name, sha256, state, spec, table, warnings)


class Detector:
    """torchvision's detector of ``spec`` with the ``payload`` state dict, ready on ``device``
    for ``precision`` (``precision.prepare_model``); ``canvas``: how images of different sizes
    share a batch (``inference``)."""

    def __init__(self, spec: ModelSpec, payload: dict[str, torch.Tensor], device: torch.device,
                 precision: str = "fp32", canvas: str = "exact"):
        self.model = build_loaded_model(spec, payload)
        prepare_model(self.model, device, precision)
        if device.type == "cuda":    # where per-image post-processing waits on launches
            batched_postprocess.install(self.model)
        self.device, self.precision, self.canvas = device, precision, canvas

    def predict(self, images: list[np.ndarray | torch.Tensor],
                resize: list[bool]) -> list[ImageDetections]:
        """The detections of ``H×W×3`` uint8 RGB ``images``, host arrays or tensors on the
        device (``decode: predictor``); ``resize[k]`` false: a tile, at its own resolution."""
        tensors = [image_tensor(image, self.device) for image in images]
        return predict_images(self.model, tensors, self.precision, self.canvas, resize)

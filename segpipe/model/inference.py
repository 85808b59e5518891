"""One forward pass of a detection model on a batch of decoded images: tensors, the batch canvas,
the network, and the detections back on the host in original-image pixels."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList

from segpipe.model.detections import ImageDetections
from segpipe.model.precision import run_network, uses_channels_last


def image_tensor(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``H×W×3`` uint8 → ``3×H×W`` float in [0, 1], exactly as ``TF.to_tensor`` computes it.
    ``pixels`` are a host array, or a tensor (already on ``device`` when ``model.jpeg``
    decoded it there)."""
    if isinstance(pixels, torch.Tensor):
        hwc = pixels
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: only ever read here
            hwc = torch.from_numpy(pixels)
    if device.type == "cuda" and hwc.device.type == "cpu":
        hwc = hwc.pin_memory()
    chw = hwc.to(device, non_blocking=True).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div(255)


def canvas_shape(height: int, width: int, model: GeneralizedRCNN, canvas: str) -> tuple[int, int]:
    """The padded shape a resized ``height×width`` image is batched in (see the module doc)."""
    divisor = model.transform.size_divisible

    def up(n: int) -> int:
        return -(-n // divisor) * divisor

    if canvas == "exact":
        return up(height), up(width)
    short = up(max(model.transform.min_size))
    long = max(up(model.transform.max_size), short)
    shape = (short, long) if width >= height else (long, short)
    if height > shape[0] or width > shape[1]:  # cannot happen with torchvision's resize
        return up(height), up(width)
    return shape


def pad_batch(images: list[torch.Tensor], shape: tuple[int, int],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Stack ``3×h×w`` images into ``N×3×H×W`` zeros, top-left aligned (``batch_images``),
    laid out in ``memory_format`` by the same copy (no separate conversion pass)."""
    batch = images[0].new_zeros((len(images), 3, *shape)).contiguous(memory_format=memory_format)
    for slot, image in zip(batch, images):
        slot[:, :image.shape[-2], :image.shape[-1]].copy_(image)
    return batch


def detections_to_host(detections: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """Every image's boxes, scores, labels and mask probabilities in one device-to-host copy.

    The detection counts are known on the host already (NMS gave them), so the packing needs
    no synchronisation of its own; labels travel as float32, exact below 2**24."""
    parts, layout = [], []
    for det in detections:
        n = len(det["scores"])
        masks = det.get("masks")
        m = masks.shape[-1] if masks is not None else 0
        parts += [det["boxes"].float().reshape(-1), det["scores"].float(),
                  det["labels"].float()]
        if masks is not None:
            parts.append(masks.float().reshape(-1))
        layout.append((n, m))
    flat = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.float32)
    out, at = [], 0
    for n, m in layout:
        boxes = flat[at:at + 4 * n].reshape(n, 4)
        at += 4 * n
        scores = flat[at:at + n]
        at += n
        labels = flat[at:at + n].astype(np.int32)
        at += n
        masks = flat[at:at + n * m * m].reshape(n, m, m)
        at += n * m * m
        out.append({"boxes": boxes, "scores": scores, "labels": labels, "masks": masks})
    return out


def resize_boxes(boxes: np.ndarray, resized: tuple[int, int],
                 original: tuple[int, int]) -> np.ndarray:
    """torchvision's ``resize_boxes`` on the host: the same float32 ratios and products."""
    ratio_h = np.float32(original[0]) / np.float32(resized[0])
    ratio_w = np.float32(original[1]) / np.float32(resized[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


@torch.inference_mode()
def predict_images(model: GeneralizedRCNN, images: list[torch.Tensor], precision: str = "fp32",
                   canvas: str = "exact",
                   resize: Optional[Sequence[bool]] = None) -> list[ImageDetections]:
    """Detect instances in ``images`` (``3×H×W`` floats on the model's device); the model was
    made ready for ``precision`` by ``precision.prepare_model``. ``resize[k]`` false: image
    ``k`` is a tile, predicted at its own resolution (the model's resize skipped) and
    batched on its exact canvas."""
    transform = model.transform
    resize = [True] * len(images) if resize is None else list(resize)
    prepared = [transform.resize(transform.normalize(image), None)[0] if scaled
                else transform.normalize(image) for image, scaled in zip(images, resize)]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (resized, scaled) in enumerate(zip(prepared, resize)):
        height, width = resized.shape[-2:]
        groups[canvas_shape(height, width, model, canvas if scaled else "exact")].append(index)

    memory_format = (torch.channels_last if images and uses_channels_last(images[0].device,
                                                                         precision)
                     else torch.contiguous_format)
    results: list[Optional[ImageDetections]] = [None] * len(images)
    for shape, indices in groups.items():
        sizes = [tuple(prepared[i].shape[-2:]) for i in indices]
        image_list = ImageList(pad_batch([prepared[i] for i in indices], shape, memory_format),
                               sizes)
        detections = detections_to_host(run_network(model, image_list, precision))
        for i, size, det in zip(indices, sizes, detections):
            results[i] = ImageDetections(
                labels=det["labels"], scores=det["scores"],
                boxes=resize_boxes(det["boxes"], size, tuple(images[i].shape[-2:])),
                soft_masks=det["masks"])  # N×0×0 for box-only detectors
    return results  # type: ignore[return-value]

"""Run the detector on batches of decoded images: the GPU (or CPU) stage of the pipeline.

``predict_images`` is torchvision's own inference path (``transform`` → ``backbone`` → ``rpn``
→ ``roi_heads``, then ``resize_boxes``) with two differences that keep results exact and cheap:

* images are batched only with images of the same padded shape, so a detection never depends
  on which other images happened to share its batch (Ray Data does not preserve order);
* the mask head's ``M×M`` probabilities are returned as they are, instead of being pasted into
  a float32 ``H×W`` canvas per detection; the encode stage pastes them inside their boxes on
  the CPU with the same arithmetic as torchvision's ``paste_masks_in_image``.

``MaskRCNNPredictor`` is the callable class that Ray Data runs in an actor pool. Box-only
detectors (Faster R-CNN) run through the same code; their detections have no soft masks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from segpipe import schema
from segpipe.model import ModelSpec, build_model

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ImageDetections:
    """The detections of one image, in original image pixels, on the host."""

    labels: np.ndarray      # int32[N], the model's labels (CategoryTable maps them)
    scores: np.ndarray      # float32[N]
    boxes: np.ndarray       # float32[N, 4], x1 y1 x2 y2
    soft_masks: np.ndarray  # float32[N, M, M], mask probabilities for the predicted label;
                            # float32[N, 0, 0] for box-only detectors

    @property
    def has_masks(self) -> bool:
        return self.soft_masks.shape[-1] > 0


def image_tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """``H×W×3`` uint8 → ``3×H×W`` float in [0, 1], exactly as ``TF.to_tensor`` computes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: only ever read here
        host = torch.from_numpy(pixels)
    if device.type == "cuda":
        host = host.pin_memory()
    chw = host.to(device, non_blocking=True).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div(255)


@torch.inference_mode()
def predict_images(model: GeneralizedRCNN, images: list[torch.Tensor],
                   precision: str = "fp32") -> list[ImageDetections]:
    """Detect instances in ``images`` (``3×H×W`` floats on the model's device)."""
    transform = model.transform
    prepared = []
    for image in images:
        resized, _ = transform.resize(transform.normalize(image), None)
        prepared.append(resized)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    divisor = transform.size_divisible
    for index, resized in enumerate(prepared):
        h, w = resized.shape[-2:]
        groups[(-(-h // divisor) * divisor, -(-w // divisor) * divisor)].append(index)

    results: list[Optional[ImageDetections]] = [None] * len(images)
    for indices in groups.values():
        batch = transform.batch_images([prepared[i] for i in indices], size_divisible=divisor)
        sizes = [tuple(prepared[i].shape[-2:]) for i in indices]
        with _autocast(batch.device, precision):
            image_list = ImageList(batch, sizes)
            features = model.backbone(image_list.tensors)
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        for i, size, det in zip(indices, sizes, detections):
            original = tuple(images[i].shape[-2:])
            boxes = resize_boxes(det["boxes"].float(), size, original)
            masks = det.get("masks")
            results[i] = ImageDetections(
                labels=det["labels"].to(torch.int32).cpu().numpy(),
                scores=det["scores"].float().cpu().numpy(),
                boxes=boxes.cpu().numpy(),
                soft_masks=(masks[:, 0].float().cpu().numpy() if masks is not None
                            else np.zeros((len(boxes), 0, 0), np.float32)),
            )
    return results  # type: ignore[return-value]


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def select_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


class MaskRCNNPredictor:
    """Ray Data actor: decoded rows in, rows with packed detection arrays out.

    Loads the model once per actor. A batch that fails (CUDA out of memory, or anything else)
    is split in halves and retried down to single images; an image that still fails becomes an
    error row with the reason, so no batch failure loses or crashes the rest.
    """

    def __init__(self, spec: ModelSpec, weights, use_gpu: bool, precision: str = "fp32",
                 torch_threads: int = 0, fault: Optional["FaultInjection"] = None):
        import ray

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        state_dict = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
        self.device = select_device(use_gpu)
        self.precision = precision
        self.model = build_model(spec)
        self.model.load_state_dict(state_dict)
        self.model.to(self.device)
        self.fault = fault
        self.batches = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.fault is not None:
            self.fault.maybe_kill(self.batches)
        statuses = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        pixels = batch.column(schema.PIXELS).to_pylist()
        ok = [i for i, s in enumerate(statuses) if s == schema.STATUS_OK]
        arrays = [np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3) for i in ok]
        outcomes = self._predict_isolated(arrays)
        results: list[Optional[ImageDetections]] = [None] * batch.num_rows
        for i, outcome in zip(ok, outcomes):
            if isinstance(outcome, ImageDetections):
                results[i] = outcome
            else:
                statuses[i] = schema.STATUS_ERROR
                errors[i] = f"predict: {outcome}"
        return pack_detections(batch, statuses, errors, results)

    def _predict_isolated(self, arrays: list[np.ndarray]) -> list[ImageDetections | str]:
        if not arrays:
            return []
        try:
            tensors = [image_tensor(a, self.device) for a in arrays]
            return list(predict_images(self.model, tensors, self.precision))
        except Exception as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(arrays) == 1:
                return [f"{type(exc).__name__}: {str(exc).strip()[:300]}"]
            half = len(arrays) // 2
            return self._predict_isolated(arrays[:half]) + self._predict_isolated(arrays[half:])


@dataclass(frozen=True)
class FaultInjection:
    """Testing only: kill this actor's worker process in the middle of batch ``after + 1``.

    The first actor to get there leaves ``marker`` behind, so the restarted actor (and every
    other one) carries on: the run shows that Ray redoes the lost batch and no image is lost.
    """

    after: int
    marker: str

    def maybe_kill(self, batches: int) -> None:
        if batches <= self.after:
            return
        from segpipe import storage

        fs, path = storage.resolve(self.marker)
        if storage.exists(fs, path):
            return
        storage.write_bytes_atomic(fs, path, f"killed pid {os.getpid()}\n".encode())
        os._exit(17)


def pack_detections(batch: pa.Table, statuses: list[str], errors: list[Optional[str]],
                    results: list[Optional[ImageDetections]]) -> pa.Table:
    """Build the predictor's output rows: per image, the detection arrays as raw bytes."""
    def packed(attr: str) -> pa.Array:
        return pa.array([getattr(r, attr).tobytes() if r is not None else b"" for r in results],
                        pa.binary())

    return pa.table({
        **schema.image_columns(batch, statuses, errors),
        schema.NUM_DETECTIONS: pa.array([len(r.scores) if r is not None else 0 for r in results],
                                        pa.int32()),
        schema.MASK_SIZE: pa.array([r.soft_masks.shape[-1] if r is not None else 0
                                    for r in results], pa.int32()),
        schema.LABELS: packed("labels"),
        schema.SCORES: packed("scores"),
        schema.BOXES: packed("boxes"),
        schema.SOFT_MASKS: packed("soft_masks"),
    })


def unpack_detections(row: dict) -> ImageDetections:
    """Inverse of ``pack_detections`` for one row (a dict of column values)."""
    n, m = row[schema.NUM_DETECTIONS], row[schema.MASK_SIZE]
    return ImageDetections(
        labels=np.frombuffer(row[schema.LABELS], np.int32),
        scores=np.frombuffer(row[schema.SCORES], np.float32),
        boxes=np.frombuffer(row[schema.BOXES], np.float32).reshape(n, 4),
        soft_masks=np.frombuffer(row[schema.SOFT_MASKS], np.float32).reshape(n, m, m),
    )

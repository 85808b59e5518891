"""Hugging Face transformers behind the model seam (``families``), ``--arch transformers
--weights DIR``: a folder ``save_pretrained`` wrote (``config.json``, ``*.safetensors`` and
the image processor's ``preprocessor_config.json``).

transformers is an optional extra (``segpipe[transformers]``), imported only when a run uses
this family. Two kinds of model, told apart by the folder's ``config.json``:

* **Mask2Former** (``AutoModelForUniversalSegmentation``): instance masks as the image
  processor's ``post_process_instance_segmentation(outputs, threshold=score_floor,
  target_sizes=..., return_binary_maps=True)`` makes them: each (query, class) pair among the
  best ``num_queries`` scores its class probability times the mean mask probability inside its
  mask (mask logits resized to 384 × 384, ``> 0``), kept at ``score_floor`` and up; a mask
  that is empty at the image's size is dropped, as there. No NMS (``--nms-threshold`` is not
  used). The masks leave the predictor as crops of the model's mask logits
  (``grids``, frame ``mask2former``), reaching every cell above probability
  ``grids.GRID_FLOOR``: re-exports are exact at any mask threshold from there up. The box of a
  detection is the tight box of its mask at 0.5 (Mask2Former predicts none).
* **Object detectors** (``AutoModelForObjectDetection``: DETR, Deformable DETR, Conditional
  DETR, RT-DETR, ...): boxes only, from the processor's own
  ``post_process_object_detection(outputs, threshold=score_floor, target_sizes=...)``.

Loading runs no code from the folder: safetensors only (a ``pytorch_model.bin`` is a pickle
and is refused), no ``trust_remote_code``, nothing downloaded. Images of one shape share a
batch (the processor pads a batch to its largest image, and the post-processing reads the
padded map as the image: one shape per batch keeps each image's detections as a batch of one
would give them). Tiles (``resize`` false) go through the processor like whole images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from segpipe.config import ConfigError, one_line
from segpipe.model.categories import Category, CategoryError, named_classes_table
from segpipe.model.detections import ImageDetections, per_shape
from segpipe.model.grids import GRID_FLOOR, GRID_MARGIN, MASK2FORMER_SIDE, logit, nearest_index
from segpipe.model.precision import autocast
from segpipe.model.resolved import ResolvedWeights
from segpipe.model.spec import ModelSpec
from segpipe.model.weights import WeightsSource

#: The masks are crops of Mask2Former's mask logits over the processed image (``grids``).
MASK_FRAME = "mask2former"
#: The universal-segmentation models whose instance post-processing segpipe replicates.
MASKED_TYPES = ("mask2former",)
#: The files of a ``save_pretrained`` folder the actors need (configs and safetensors).
PAYLOAD_SUFFIXES = (".json", ".safetensors")


def resolve(source: WeightsSource, spec: ModelSpec, seed: int = 0,
            categories: Optional[tuple[Category, ...]] = None,
            show_progress: bool = False) -> ResolvedWeights:
    """Read and check a ``save_pretrained`` folder: its model type, safetensors weights that
    fill the whole model, the image processor and the classes. The payload is the folder's
    config and safetensors files, loaded again in each actor. ``ConfigError`` in one line for
    anything that cannot run."""
    if source.kind != "folder" or source.path is None:
        raise ConfigError("--arch transformers takes --weights DIR: a folder written by "
                          "save_pretrained (model and image processor), with safetensors weights")
    folder = source.path
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
             if p.is_file() and p.name.endswith(PAYLOAD_SUFFIXES)}
    if not any(name.endswith(".safetensors") for name in files):
        pickled = [p.name for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth"))]
        what = f"holds {pickled[0]}, a pickle that could run code" if pickled else "holds no weights"
        raise ConfigError(f"weights {source.name} {what}: segpipe loads safetensors only "
                          "(save_pretrained(..., safe_serialization=True) writes them)")
    model, processor, masked = load(files, source.name)
    names = {int(k): str(v) for k, v in model.config.id2label.items()}
    try:
        table = named_classes_table(names, categories)
    except CategoryError as exc:
        raise ConfigError(f"{exc} (weights {source.name})") from None
    spec = dataclasses.replace(spec, num_classes=table.num_classes, masks=masked,
                               image_size=spec.image_size or _shortest_side(processor),
                               mask_frame=MASK_FRAME if masked else None)
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return ResolvedWeights(source.kind, source.name, digest.hexdigest(), files, spec, table, [])


def load(files: dict[str, bytes], name: str) -> tuple[torch.nn.Module, Any, bool]:
    """The model (eval mode), its image processor and whether it predicts masks, from a
    folder's files: safetensors only, no remote code, nothing downloaded."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
    )

    with tempfile.TemporaryDirectory(prefix="segpipe-hf-") as folder:
        for file_name, data in files.items():
            (Path(folder) / file_name).write_bytes(data)
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - every refusal is one line
            raise ConfigError(f"weights {name}: cannot read config.json ({_reason(exc, folder, name)})") from None
        model_type = str(getattr(config, "model_type", ""))
        if getattr(config, "auto_map", None):
            raise ConfigError(f"weights {name} need code of their own (auto_map in config.json): "
                              "segpipe runs transformers' built-in models only")
        build: Any
        if model_type in MASKED_TYPES:
            build, masked = transformers.AutoModelForUniversalSegmentation, True
        elif model_type in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
            build, masked = transformers.AutoModelForObjectDetection, False
        else:
            raise ConfigError(f"weights {name} are a {model_type or 'unknown'} model; --arch "
                              "transformers runs Mask2Former (instance masks) and object detectors "
                              f"({', '.join(sorted(MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES)[:6])}, ...)")
        try:
            model, info = build.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                output_loading_info=True)
            processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - every refusal is one line
            raise ConfigError(f"weights {name}: cannot load the {model_type} model and its image "
                              f"processor ({_reason(exc, folder, name)})") from None
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:
        raise ConfigError(f"weights {name} do not fill the {model_type} model: {len(missing)} "
                          f"tensors missing or of another shape (first: {str(missing[0])[:80]})")
    return model.float().eval(), processor, masked


def _reason(exc: Exception, folder: str, name: str) -> str:
    return f"{type(exc).__name__}: {one_line(str(exc).replace(folder, name), 240)}"


def _shortest_side(processor: Any) -> Optional[int]:
    size = dict(getattr(processor, "size", None) or {})
    side = size.get("shortest_edge") or size.get("height")
    return int(side) if side else None


def _sized(processor: Any, image_size: Optional[int]) -> Any:
    """The processor resizing to ``image_size`` (its shortest side; a longest side scaled
    as the processor's own, or a square for processors of a fixed size)."""
    size = dict(getattr(processor, "size", None) or {})
    own = _shortest_side(processor)
    if not image_size or not own or image_size == own:
        return processor
    if "shortest_edge" in size:
        longest = size.get("longest_edge")
        size = {"shortest_edge": image_size,
                **({"longest_edge": round(longest * image_size / own)} if longest else {})}
    else:
        size = {"height": image_size, "width": image_size}
    processor.size = size
    return processor


class Detector:
    """A ``save_pretrained`` folder's model on ``device``: fp32, bf16 or fp16 (autocast; the
    post-processing in fp32). ``canvas`` is not used: images of one shape share a batch."""

    def __init__(self, spec: ModelSpec, payload: dict[str, bytes], device: torch.device,
                 precision: str = "fp32", canvas: str = "exact"):
        model, processor, self.masked = load(payload, "payload")
        self.model = model.to(device)
        self.processor = _sized(processor, spec.image_size)
        self.spec, self.device, self.precision = spec, device, precision

    def predict(self, images: list[np.ndarray], resize: list[bool]) -> list[ImageDetections]:
        """The detections of ``H×W×3`` uint8 RGB ``images``, those of one shape in one batch."""
        return per_shape(images, self._predict_same_shape)

    def _predict_same_shape(self, images: list[np.ndarray]) -> list[ImageDetections]:
        inputs = self.processor(images=[np.array(image) for image in images], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            with autocast(self.device, self.precision):
                outputs = self.model(**inputs)
            for key in ("logits", "pred_boxes", "class_queries_logits", "masks_queries_logits"):
                if getattr(outputs, key, None) is not None:
                    setattr(outputs, key, getattr(outputs, key).float())
            sizes = [image.shape[:2] for image in images]
            if self.masked:
                return [self._instances(outputs.class_queries_logits[k], outputs.masks_queries_logits[k],
                                        *sizes[k]) for k in range(len(images))]
            found = self.processor.post_process_object_detection(
                outputs, threshold=self.spec.score_floor, target_sizes=sizes)
            return [self._boxes(f) for f in found]

    def _boxes(self, found: dict) -> ImageDetections:
        scores = found["scores"].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[:self.spec.detections_per_image]
        return ImageDetections(found["labels"].cpu().numpy()[order].astype(np.int32) + 1,
                               scores[order].astype(np.float32),
                               found["boxes"].float().cpu().numpy()[order].astype(np.float32),
                               np.zeros((len(order), 0, 0), np.float32))

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, height: int,
                   width: int) -> ImageDetections:
        """``post_process_instance_segmentation``'s detections of one image, each mask as the
        crop of its logits that reaches every cell above ``GRID_FLOOR``."""
        queries, classes = class_logits.shape[0], class_logits.shape[1] - 1
        square = torch.nn.functional.interpolate(mask_logits[None], size=(MASK2FORMER_SIDE,) * 2,
                                                 mode="bilinear", align_corners=False)[0]
        probabilities = torch.nn.functional.softmax(class_logits, dim=-1)[:, :-1]
        top, pairs = probabilities.flatten().topk(queries, sorted=False)
        labels, picked = pairs % classes, torch.div(pairs, classes, rounding_mode="floor")
        inside = (square[picked] > 0).float()
        mask_scores = (square[picked].sigmoid().flatten(1) * inside.flatten(1)).sum(1) / \
            (inside.flatten(1).sum(1) + 1e-6)
        scores = top * mask_scores
        # the masks at the image's size (nearest rows and columns of the square), as far as
        # which rows and columns hold a pixel: whether a mask is empty there, and its box
        rows, row_at = np.unique(nearest_index(MASK2FORMER_SIDE, height), return_inverse=True)
        cols, col_at = np.unique(nearest_index(MASK2FORMER_SIDE, width), return_inverse=True)
        sampled = inside[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)].bool().cpu().numpy()
        on_rows, on_cols = sampled.any(2)[:, row_at], sampled.any(1)[:, col_at]
        score_values = scores.cpu().numpy().astype(np.float64)   # to the host once; compared as .item()
        kept = [j for j in range(queries)
                if score_values[j] >= self.spec.score_floor and sampled[j].any()]
        kept.sort(key=lambda j: -score_values[j])
        kept = kept[:self.spec.detections_per_image]
        boxes = np.zeros((len(kept), 4), np.float32)
        for n, j in enumerate(kept):
            ys, xs = np.flatnonzero(on_rows[j]), np.flatnonzero(on_cols[j])
            boxes[n] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
        grid_h, grid_w = mask_logits.shape[1:]
        grids = np.zeros((len(kept), 6), np.int32)
        crops = []
        floor = logit(GRID_FLOOR)
        for n, j in enumerate(kept):
            logits = mask_logits[picked[j]]
            y_on = torch.nonzero((logits > floor).any(1)).flatten().tolist()
            x_on = torch.nonzero((logits > floor).any(0)).flatten().tolist()
            y0, y1 = max(y_on[0] - GRID_MARGIN, 0), min(y_on[-1] + 1 + GRID_MARGIN, grid_h)
            x0, x1 = max(x_on[0] - GRID_MARGIN, 0), min(x_on[-1] + 1 + GRID_MARGIN, grid_w)
            grids[n] = (grid_h, grid_w, x0, y0, x1, y1)
            crops.append(logits[y0:y1, x0:x1].reshape(-1))
        soft = torch.cat(crops).cpu().numpy().astype(np.float32) if crops else np.zeros(0, np.float32)
        chosen = torch.tensor(kept, dtype=torch.long)
        return ImageDetections(labels[chosen].cpu().numpy().astype(np.int32) + 1,
                               scores[chosen].cpu().numpy().astype(np.float32), boxes, soft,
                               mask_grids=grids)


"""Ultralytics YOLO (detect and segment: YOLOv8, YOLO11, YOLO26 and their fine-tunes) behind
the model seam (``families``), ``--arch ultralytics --weights FILE.pt``.

Ultralytics is AGPL-3.0: an optional extra (``segpipe[ultralytics]``), imported only when a
run uses this family. The detections are those ``YOLO(FILE).predict(images, conf=score_floor,
iou=nms_threshold, imgsz=image_size, max_det=detections_per_image, retina_masks=True)`` gives,
step by step with Ultralytics' own parts:

* the checkpoint is read with ``torch_safe_load(path, safe_only=True)``: ``torch.load`` with
  ``weights_only=True`` and Ultralytics' allow-list of its model classes, so nothing in the
  file runs; a file that needs anything else is refused in one line (Ultralytics' default
  loader unpickles it);
* images of one shape are letterboxed together (``LetterBox``, ``auto=True``: what
  ``predict`` does for a list of images of one shape, and for each single image), run through
  Ultralytics' ``AutoBackend`` (layers fused), and their boxes kept by Ultralytics' own
  ``non_max_suppression`` (never cut short by its time limit: no image loses detections to a
  slow node) and scaled back with ``scale_boxes``;
* a segmentation model's masks are ``ops.process_mask_native``'s: each detection's
  prototype logits, cropped to the cells its box can reach (``grids.ultralytics_window``),
  become masks in the encode stage (``grids``, ``MASK_FRAME``).

Differences: Ultralytics drops a detection whose mask is empty; segpipe keeps it in
predictions/ and every export leaves it out, counted. Tiles (``resize`` false) are letterboxed
to the model's size like whole images, as SAHI runs YOLO on slices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from segpipe.config import ConfigError, one_line
from segpipe.model.categories import Category, CategoryError, named_classes_table
from segpipe.model.detections import ImageDetections, per_shape
from segpipe.model.grids import ultralytics_window
from segpipe.model.precision import as_fp32, autocast
from segpipe.model.resolved import ResolvedWeights
from segpipe.model.spec import ModelSpec
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE, WeightsSource, fetch

#: The masks are crops of the prototype mask map over the letterboxed image (``grids``).
MASK_FRAME = "ultralytics"
#: The input size of a checkpoint that does not record one (Ultralytics' default).
DEFAULT_IMAGE_SIZE = 640
#: The tasks segpipe runs (pose, obb and classify models are refused).
TASKS = ("detect", "segment")
#: What ``--weights random`` builds: YOLO11n-seg from Ultralytics' model YAML.
RANDOM_MODEL = "yolo11n-seg.yaml"


def resolve(source: WeightsSource, spec: ModelSpec, seed: int = 0,
            categories: Optional[tuple[Category, ...]] = None,
            show_progress: bool = False) -> ResolvedWeights:
    """Read and check a YOLO checkpoint (its task, classes and input size); the payload is
    the file's bytes, loaded safely again in each actor. ``ConfigError`` in one line for a
    file that cannot be loaded safely, another task, or categories of another count."""
    if source.kind == "random":
        data = random_checkpoint(RANDOM_MODEL, len(categories) if categories else 80, seed)
    else:
        fetch(source, show_progress=show_progress)
        assert source.path is not None
        try:
            data = source.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read weights file {source.path}: {exc.strerror or exc}") from None
    model, args = load_model(data, source.name)
    task = getattr(model, "task", None)
    if task not in TASKS:
        raise ConfigError(f"weights {source.name} are an Ultralytics {task} model; segpipe runs "
                          f"{' and '.join(TASKS)} models")
    names = [str(model.names[k]) for k in sorted(model.names)]
    stride = int(max(model.stride)) if hasattr(model, "stride") else 32
    image_size = _input_size(spec.image_size or args.get("imgsz") or DEFAULT_IMAGE_SIZE, stride)
    spec = dataclasses.replace(spec, num_classes=len(names) + 1, masks=task == "segment",
                               image_size=image_size, mask_frame=MASK_FRAME)
    try:
        table = named_classes_table(dict(enumerate(names)), categories)
    except CategoryError as exc:
        raise ConfigError(f"{exc} (weights {source.name})") from None
    warnings = [RANDOM_WEIGHTS_NOTE] if source.kind == "random" else []
    sha256 = hashlib.sha256(data).hexdigest()
    return ResolvedWeights(source.kind, source.name, sha256, data, spec, table, warnings)


def _input_size(size: int, stride: int) -> int:
    """``size`` made a multiple of the model's stride, as Ultralytics' ``check_imgsz`` does."""
    from ultralytics.utils.checks import check_imgsz

    return int(check_imgsz(int(size), stride=stride, min_dim=1))


def load_model(data: bytes, name: str) -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint's bytes and its training arguments, loaded with Ultralytics'
    restricted loader (``weights_only=True`` and its allow-list): nothing in the file runs."""
    from ultralytics.nn.tasks import torch_safe_load

    with tempfile.TemporaryDirectory(prefix="segpipe-yolo-") as folder:
        path = Path(folder) / "weights.pt"      # Ultralytics reads files named *.pt only
        path.write_bytes(data)
        try:
            checkpoint, _ = torch_safe_load(str(path), safe_only=True)
        except Exception as exc:  # noqa: BLE001 - every refusal is one line
            reason = one_line(str(exc).replace(str(path), name))
            reason = reason.encode("ascii", "ignore").decode().replace("ERROR  ", "")[:300]
            raise ConfigError(f"cannot load weights {name} as an Ultralytics checkpoint without "
                              f"running code from it ({type(exc).__name__}: {reason.strip()})") from None
    model = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"weights {name} hold no Ultralytics model (a checkpoint as Ultralytics' "
                          "training or model.save writes it)")
    # as Ultralytics' load_checkpoint: the default arguments under the training ones; the task
    # the model says, else the training's, else its head's (Ultralytics would take the default
    # arguments' "detect" for a segmentation model saved without one, and fail)
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import guess_model_task

    train_args = dict(checkpoint.get("train_args") or {})
    model = model.float().eval()
    model.task = getattr(model, "task", None) or train_args.get("task") or guess_model_task(model)
    model.args = {**DEFAULT_CFG_DICT, **train_args}
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model, train_args


def random_checkpoint(model_yaml: str, classes: int, seed: int) -> bytes:
    """A checkpoint of Ultralytics' ``model_yaml`` with ``classes`` classes and seeded random
    weights, as ``torch.save`` of Ultralytics' checkpoint dict (smoke tests only)."""
    import io

    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    build = SegmentationModel if "-seg" in model_yaml else DetectionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(model_yaml, nc=classes, verbose=False)
    model.names = {k: f"class_{k + 1}" for k in range(classes)}
    buffer = io.BytesIO()
    torch.save({"model": model.eval(), "train_args": {}}, buffer)
    return buffer.getvalue()


class Detector:
    """A YOLO checkpoint's model in Ultralytics' ``AutoBackend`` on ``device``: fp32, bf16
    (autocast; the head's box decode and anchors stay in fp32) or fp16 (on CUDA, Ultralytics'
    half model). ``canvas`` is not used: images of one shape share a batch."""

    def __init__(self, spec: ModelSpec, payload: bytes, device: torch.device,
                 precision: str = "fp32", canvas: str = "exact"):
        from ultralytics.nn.autobackend import AutoBackend

        model, _ = load_model(payload, "payload")
        for module in model.modules():
            if hasattr(module, "inplace"):
                module.inplace = True
        self.backend = AutoBackend(model=model, device=device, fp16=precision == "fp16",
                                   fuse=True, verbose=False)
        if precision == "bf16":
            _keep_decode_in_fp32(self.backend.model)
        self.spec, self.device, self.precision = spec, device, precision
        self.stride = int(self.backend.stride)
        self.masks = getattr(model, "task", "detect") == "segment"
        self.classes = len(model.names)
        self.end2end = bool(getattr(self.backend.model, "end2end", False))

    def predict(self, images: list[np.ndarray], resize: list[bool]) -> list[ImageDetections]:
        """The detections of ``H×W×3`` uint8 RGB ``images``, those of one shape in one batch."""
        return per_shape(images, self._predict_same_shape)

    def _predict_same_shape(self, images: list[np.ndarray]) -> list[ImageDetections]:
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils import nms, ops

        assert self.spec.image_size is not None   # resolve() always sets it
        letterbox = LetterBox(self.spec.image_size, auto=True, stride=self.stride)
        batch = torch.from_numpy(np.stack([np.asarray(letterbox(image=image)) for image in images]))
        batch = batch.to(self.device).permute(0, 3, 1, 2).contiguous()
        # the dtype of the model AutoBackend holds (half for fp16 on CUDA)
        batch = (batch.half() if self.backend.fp16 else batch.float()).div_(255)
        with torch.inference_mode(), autocast(self.device, "fp32" if self.precision == "fp16"
                                              else self.precision):
            raw = self.backend(batch)
            protos = None
            if self.masks:   # SegmentationPredictor.postprocess
                protos = raw[0][1] if isinstance(raw[0], tuple) else raw[1]
                raw = raw[0]
            kept = nms.non_max_suppression(
                as_fp32(raw), self.spec.score_floor, self.spec.nms_threshold, None, False,
                max_det=self.spec.detections_per_image, nc=self.classes if self.masks else 0,
                end2end=self.end2end, max_time_img=float("inf"))
            results = []
            for k, (pred, image) in enumerate(zip(kept, images)):
                pred = pred.float()
                pred[:, :4] = ops.scale_boxes(batch.shape[2:], pred[:, :4], image.shape)
                results.append(self._detections(pred, None if protos is None else protos[k].float(),
                                                image.shape[0], image.shape[1]))
        return results

    def _detections(self, pred: torch.Tensor, protos: Optional[torch.Tensor], height: int,
                    width: int) -> ImageDetections:
        """One image's kept rows (x1 y1 x2 y2 score class [mask coefficients]) on the host;
        a mask as its prototype logits over the cells its box reaches."""
        boxes = pred[:, :4].cpu().numpy().astype(np.float32)
        scores = pred[:, 4].cpu().numpy().astype(np.float32)
        labels = pred[:, 5].cpu().numpy().astype(np.int32) + 1
        if protos is None:
            return ImageDetections(labels, scores, boxes, np.zeros((len(scores), 0, 0), np.float32))
        channels, grid_h, grid_w = protos.shape
        logits = (pred[:, 6:] @ protos.view(channels, -1)).view(-1, grid_h, grid_w)
        crops, grids = [], np.zeros((len(scores), 6), np.int32)
        for k, box in enumerate(boxes):
            x0, y0, x1, y1 = ultralytics_window(box, grid_h, grid_w, height, width)
            crops.append(logits[k, y0:y1, x0:x1].reshape(-1))
            grids[k] = (grid_h, grid_w, x0, y0, x1, y1)
        soft = torch.cat(crops).cpu().numpy().astype(np.float32) if crops else np.zeros(0, np.float32)
        return ImageDetections(labels, scores, boxes, soft, mask_grids=grids)


def _keep_decode_in_fp32(model: torch.nn.Module) -> None:
    """Under bf16 autocast, run the detection head's box decode (anchors, distances, strides)
    in fp32: in bf16 a coordinate past 256 px moves in steps of 2 px or more."""
    head = model.model[-1] if hasattr(model, "model") else None
    inference = getattr(head, "_inference", None)
    if head is None or inference is None:
        return

    def fp32_inference(x: dict) -> torch.Tensor:
        device_type = next(iter(v for v in x.values() if isinstance(v, torch.Tensor))).device.type
        with torch.autocast(device_type, enabled=False):
            return inference({k: as_fp32(v) for k, v in x.items()})

    head._inference = fp32_inference

"""Run the detector on batches of decoded images: the GPU (or CPU) stage of the pipeline.

``predict_images`` is torchvision's own inference path (``transform`` → ``backbone`` → ``rpn``
→ ``roi_heads``, then ``resize_boxes``) with these differences, which keep results exact and
the device busy:

* images are batched only with images of the same canvas (padded shape), so a detection never
  depends on which other images happened to share its batch (Ray Data does not preserve
  order; batched kernels may still differ in the last bits of float rounding).
  ``canvas="exact"`` pads each image to its own size rounded up to 32, as torchvision
  does for one image alone (bit-identical to it in fp32); ``canvas="fixed"`` pads every
  landscape image to one canvas and every portrait image to another, so mixed sizes still
  make full GPU batches (padding changes results near the right and bottom edges slightly,
  the same way for every run);
* low precision (``precision.py``) runs the network in bf16/fp16 and every box decode,
  anchor, NMS input and mask probability in fp32;
* each batch's detections come to the host in one packed device-to-host copy, and boxes are
  scaled back to original pixels there (``resize_boxes``' float32 arithmetic, on NumPy);
* the mask head's ``M×M`` probabilities are returned as they are, instead of being pasted into
  a float32 ``H×W`` canvas per detection; the encode stage pastes them inside their boxes on
  the CPU with the same arithmetic as torchvision's ``paste_masks_in_image``.

``MaskRCNNPredictor`` is the callable class that Ray Data runs in an actor pool. Box-only
detectors (Faster R-CNN) run through the same code; their detections have no soft masks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList

from segpipe import schema
from segpipe.decode import pixel_arrays
from segpipe.detections import ImageDetections, pack_detections
from segpipe.model import ModelSpec, build_model
from segpipe.precision import prepare_model, run_network, uses_channels_last
from segpipe.tiles import TileSettings, View, image_views, merge_views

def image_tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """``H×W×3`` uint8 → ``3×H×W`` float in [0, 1], exactly as ``TF.to_tensor`` computes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: only ever read here
        host = torch.from_numpy(pixels)
    if device.type == "cuda":
        host = host.pin_memory()
    chw = host.to(device, non_blocking=True).permute(2, 0, 1).contiguous()
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
        groups[canvas_shape(*resized.shape[-2:], model,
                            canvas if scaled else "exact")].append(index)

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


class DeviceError(RuntimeError):
    """A GPU was asked for and cannot be used; the message holds the facts to fix it."""


def cuda_facts() -> dict[str, Any]:
    """What decides whether torch can use a GPU here: torch's CUDA build, the driver, the
    devices Ray (or the user) made visible."""
    driver = Path("/proc/driver/nvidia/version")
    facts: dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "driver": (driver.read_text().splitlines()[0].strip() if driver.exists()
                   else "no NVIDIA driver loaded (/proc/driver/nvidia/version is missing)"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts["cuda_available"] = torch.cuda.is_available()
        facts["device_count"] = torch.cuda.device_count() if facts["cuda_available"] else 0
    facts["torch_says"] = "; ".join(str(w.message).strip() for w in caught) or None
    return facts


def select_device(use_gpu: bool) -> torch.device:
    """``cuda`` when a GPU was asked for, ``cpu`` otherwise; a GPU asked for that torch cannot
    use is an error (``DeviceError``), never a silent 100× slower run on the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    facts = cuda_facts()
    if not facts["cuda_available"]:
        raise DeviceError(
            "this predictor was given a GPU but torch cannot use it: "
            + ", ".join(f"{key}={value}" for key, value in facts.items() if value is not None)
            + ". Install a torch build whose CUDA the driver supports (`nvidia-smi` shows the "
              "driver's CUDA version), or run with --num-gpus 0")
    return torch.device("cuda")


def describe_device(device: torch.device, precision: str) -> dict[str, Any]:
    """The device a predictor actually runs on, for run.json."""
    described: dict[str, Any] = {"device": device.type, "precision": precision,
                                 "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        described.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                         capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        described.update(threads=torch.get_num_threads())
    return described


def actor_identity() -> dict[str, str]:
    """This Ray actor's id and its node's, for the run's record of where predictors ran."""
    import ray

    context = ray.get_runtime_context()
    return {"actor": context.get_actor_id() or "", "node": context.get_node_id()}


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error after which the context is unusable (illegal address, device-side assert,
    launch failure): only a new process recovers. Out-of-memory is not one of them."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "CUBLAS_STATUS" in text
                                              or "CUDNN_STATUS" in text)


def end_actor(reason: str) -> None:
    """End this actor's process so Ray restarts it (and retries its batch) with a new CUDA
    context; every later image would fail in this one."""
    print(f"segpipe: predictor {os.getpid()} ends its process: {reason}", flush=True)
    os._exit(70)


class MaskRCNNPredictor:
    """Ray Data actor: decoded rows in, rows with packed detection arrays out.

    Loads the model once per actor. With ``tiling``, an image larger than a tile is
    predicted as its tiles (``tiles.py``), ``chunk`` views per forward pass (0: the whole
    batch at once), and its detections merged; it is ok only when every one of its views
    is. A batch that runs out of GPU memory is split in halves and retried down to single
    images, after the failed attempt's tensors are freed; an image that
    still fails (out of memory alone, or any ordinary error) becomes an error row with the
    reason. A CUDA error that leaves the device unusable ends the actor instead: Ray restarts
    it and retries the batch, so no later image is lost to a dead context.
    """

    def __init__(self, spec: ModelSpec, weights, use_gpu: bool, precision: str = "fp32",
                 torch_threads: int = 0, fault: Optional["FaultInjection"] = None,
                 canvas: str = "exact", monitor: Optional[Any] = None,
                 tiling: Optional[TileSettings] = None, chunk: int = 0):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        state_dict = weights
        if not isinstance(weights, dict):  # the driver's ray.put of the state dict
            import ray

            state_dict = ray.get(weights)
        self.device = select_device(use_gpu)
        self.precision = precision
        self.canvas = canvas
        self.tiling = tiling
        self.chunk = chunk
        self.model = build_model(spec)
        self.model.load_state_dict(state_dict)
        prepare_model(self.model, self.device, precision)
        self.fault = fault
        self.batches = 0
        self._streams = threading.local()
        if monitor is not None:
            monitor.add_device.remote(describe_device(self.device, precision), actor_identity())

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Predict one batch; with ``predictor_threads`` > 1 Ray calls this from several
        threads at once, each on a CUDA stream of its own."""
        self.batches += 1
        if self.fault is not None:
            self.fault.maybe_kill(self.batches)
        with self._thread_stream():
            return self._predict_batch(batch)

    def _thread_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if getattr(self._streams, "stream", None) is None:
            self._streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._streams.stream)

    def _predict_batch(self, batch: pa.Table) -> pa.Table:
        statuses = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        images = pixel_arrays(batch.column(schema.PIXELS), heights, widths)
        ok = [i for i, s in enumerate(statuses) if s == schema.STATUS_OK]
        views = {i: image_views(heights[i], widths[i], self.tiling) for i in ok}
        items = [(i, view) for i in ok for view in views[i]]
        crops = [(images[i][view.window[1]:view.window[3], view.window[0]:view.window[2]],
                  view.resize) for i, view in items]
        chunk = self.chunk or len(crops)
        outcomes = [outcome for start in range(0, len(crops), max(chunk, 1))
                    for outcome in self._predict_isolated(crops[start:start + chunk])]
        by_image: dict[int, list] = defaultdict(list)
        for (i, _), outcome in zip(items, outcomes):
            by_image[i].append(outcome)
        results: list[Optional[ImageDetections]] = [None] * batch.num_rows
        for i in ok:
            failed = [(k, outcome) for k, outcome in enumerate(by_image[i])
                      if not isinstance(outcome, ImageDetections)]
            if failed:
                statuses[i] = schema.STATUS_ERROR
                errors[i] = f"predict: {describe_failure(views[i], failed)}"
            else:
                results[i] = merge_views(views[i], by_image[i], self.tiling)
        return pack_detections(batch, statuses, errors, results)

    def _predict_isolated(self, arrays: list[tuple[np.ndarray, bool]]
                          ) -> list[ImageDetections | str]:
        """Predict ``(pixels, resize)`` views; each failure becomes its reason."""
        if not arrays:
            return []
        try:
            tensors = [image_tensor(a, self.device) for a, _ in arrays]
            return list(predict_images(self.model, tensors, self.precision, self.canvas,
                                       [scaled for _, scaled in arrays]))
        except Exception as exc:  # noqa: BLE001 - every failure is reported per image
            failure = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            if is_fatal_device_error(exc):
                end_actor(failure)
            out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError)
        # Retry only here, outside the handler: inside it the traceback would keep the failed
        # attempt's tensors (activations of the whole batch) alive during the retry.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(arrays) == 1:
            return [failure]
        if not out_of_memory:  # find the image that fails, keep the others
            return [item for array in arrays for item in self._predict_isolated([array])]
        half = len(arrays) // 2
        return self._predict_isolated(arrays[:half]) + self._predict_isolated(arrays[half:])


def describe_failure(views: list[View], failed: list[tuple[int, str]]) -> str:
    """The error of an image whose views failed: the reason itself for an untiled image,
    else which tiles (of how many) and the first reason."""
    if len(views) == 1:
        return failed[0][1]
    k, reason = failed[0]
    where = "the whole-image pass" if views[k].resize else f"tile at {views[k].window}"
    return f"{len(failed)} of {len(views)} views failed ({where}: {reason})"


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

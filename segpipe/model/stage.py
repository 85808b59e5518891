"""The predictor stage of the pipeline: a Ray Data callable class (load in ``__init__``, predict in
``__call__``) from decoded rows to packed detections, with GPU-memory splitting and per-image
isolation of failures."""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from segpipe import schema
from segpipe.io.decode import pixel_arrays
from segpipe.model.detections import ImageDetections, pack_detections
from segpipe.model.devices import actor_identity, describe_device, end_actor, is_fatal_device_error, select_device
from segpipe.model.families import implementation
from segpipe.model.faults import FaultInjection
from segpipe.model.jpeg import decode_jpegs
from segpipe.model.spec import ModelSpec, TileSettings
from segpipe.model.tiles import View, image_views, merge_views


class PredictStage:
    """Ray Data actor: decoded rows in, rows with packed detection arrays out.

    Loads the model once per actor: its family's ``Detector`` (``families``), from the
    ``weights`` payload the driver resolved. With ``tiling``, an image larger than a tile is
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
        payload = weights
        if isinstance(weights, ray_object_ref()):  # the driver's ray.put of the payload
            import ray

            payload = ray.get(weights)
        self.device = select_device(use_gpu)
        self.precision = precision
        self.tiling = tiling
        self.chunk = chunk
        self.detector = implementation(spec.arch).Detector(spec, payload, self.device, precision,
                                                            canvas)
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
        images: list[np.ndarray | torch.Tensor] = list(
            pixel_arrays(batch.column(schema.PIXELS), heights, widths))
        if schema.JPEG in batch.column_names:
            self._decode_jpegs(batch.column(schema.JPEG).to_pylist(), images, statuses, errors,
                               heights, widths)
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
        return pack_detections(batch, statuses, errors, results, widths, heights)

    def _decode_jpegs(self, jpegs: list[Optional[bytes]], images: list, statuses: list,
                      errors: list, heights: list, widths: list) -> None:
        """Decode the rows ``decode: predictor`` left as JPEG bytes on this actor's device
        into ``images``; one that does not decode becomes its row's error, without a size
        (as the decode task leaves a file it cannot decode)."""
        kept = [(i, data) for i, data in enumerate(jpegs)
                if data is not None and statuses[i] == schema.STATUS_OK]
        rows = [i for i, _ in kept]
        try:
            decoded = decode_jpegs([data for _, data in kept],
                                   [(heights[i], widths[i]) for i in rows], self.device)
        except Exception as exc:   # only a lost device comes here (``decode_jpegs``)
            end_actor(failure_text(exc))
            raise
        for i, image in zip(rows, decoded):
            if isinstance(image, str):
                statuses[i], errors[i] = schema.STATUS_ERROR, f"decode: {image}"
                heights[i] = widths[i] = None
            else:
                images[i] = image

    def _predict_isolated(self, arrays: list[tuple[np.ndarray | torch.Tensor, bool]]
                          ) -> list[ImageDetections | str]:
        """Predict ``(pixels, resize)`` views; each failure becomes its reason."""
        if not arrays:
            return []
        try:
            return list(self.detector.predict([a for a, _ in arrays], [scaled for _, scaled in arrays]))
        except Exception as exc:  # noqa: BLE001 - every failure is reported per image
            failure = failure_text(exc)
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


def ray_object_ref() -> type:
    """Ray's ``ObjectRef`` type (the payload comes as one from the driver's ``ray.put``; a
    ``Predictor`` in a user's ``map_batches`` gets the payload itself)."""
    try:
        from ray import ObjectRef
    except ImportError:   # no Ray: a payload is never a reference
        return type(None)
    return ObjectRef


def failure_text(exc: BaseException) -> str:
    """A failed call as a row's error and the log's line: its type and its first 300
    characters."""
    return f"{type(exc).__name__}: {str(exc).strip()[:300]}"


def describe_failure(views: list[View], failed: list[tuple[int, str]]) -> str:
    """The error of an image whose views failed: the reason itself for an untiled image,
    else which tiles (of how many) and the first reason."""
    if len(views) == 1:
        return failed[0][1]
    k, reason = failed[0]
    where = "the whole-image pass" if views[k].resize else f"tile at {views[k].window}"
    return f"{len(failed)} of {len(views)} views failed ({where}: {reason})"

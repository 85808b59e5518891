"""BENCH INSTRUMENT, never part of the product: a predictor stage that replays recorded detections.

``record_detections`` runs the real Mask R-CNN (segpipe's own ``PredictStage``, seeded random
weights) once on a few real photos and keeps its outputs; ``ReplayedDetections`` stands in
for ``PredictStage`` in the Ray Data pipeline and hands those outputs back, in turn, for every
image, so that a run of a million images measures everything but the model: listing, decode,
encode, the Parquet sink, COCO and the driver. Every figure made with it says "replayed
detections". segpipe cannot select it: only ``bench/scale.py`` swaps it in, in its own process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from segpipe import schema
from segpipe.model.detections import ImageDetections, pack_detections

LABEL = "replayed detections"


def record_detections(images: list[np.ndarray], config) -> list[ImageDetections]:
    """The real model's detections of ``images`` (HxWx3 uint8), with ``config``'s model
    settings and seeded random weights, one forward pass per image."""
    from segpipe.model.resolved import resolve_weights
    from segpipe.model.spec import ModelSpec
    from segpipe.model.stage import PredictStage

    weights = resolve_weights("random", ModelSpec.from_config(config), config.seed)
    stage = PredictStage(weights.spec, weights.payload, use_gpu=False, torch_threads=2)
    recorded = []
    for image in images:
        outcome = stage._predict_isolated([(image, True)])[0]
        if not isinstance(outcome, ImageDetections):
            raise RuntimeError(f"recording failed: {outcome}")
        recorded.append(outcome)
    return recorded


def swap_in(recorded: list[ImageDetections]) -> None:
    """Make this process's pipeline use ``ReplayedDetections`` replaying ``recorded`` (the
    class is pickled by value for Ray's workers). Only bench scripts call this, in a process
    of their own."""
    import sys

    import ray

    from segpipe import pipeline

    ReplayedDetections.recorded = recorded
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pipeline.PredictStage = ReplayedDetections   # type: ignore[misc]


class ReplayedDetections:
    """Stands in for ``PredictStage`` (same constructor keywords, all ignored): each ok image
    of a batch gets the next recorded image's detections (``recorded``, a class attribute
    that ``bench/scale.py`` sets before the class is pickled by value for Ray)."""

    recorded: list[ImageDetections] = []

    def __init__(self, **_: Any):
        self.next = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        statuses = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        results: list = []
        for status in statuses:
            if status == schema.STATUS_OK:
                results.append(self.recorded[self.next % len(self.recorded)])
                self.next += 1
            else:
                results.append(None)
        return pack_detections(batch, statuses, errors, results)

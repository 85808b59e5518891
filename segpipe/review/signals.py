"""What in an image's stored detections says a person's look would change its labels.

Four signals from what ``predictions/`` keeps (every detection down to the score floor, with
the mask head's soft mask). ``threshold`` is the export's score threshold; "kept" detections
are those at or above it. Each detection gets a value in [0, 1] per signal, and an image the
sum over its detections: an estimate of how many corrections it needs, so that an image of
many doubtful objects comes before one of a single doubtful object.

``borderline``
    detections whose score is within ``margin`` of the threshold, where one step of the
    threshold adds or removes them: ``w = 1 - |score - threshold| / margin`` (0 outside).
``mask_uncertainty``
    per kept detection, the share of the mask head's grid (its M×M probabilities over the
    box) that is neither clearly in nor clearly out: ``UNSURE_LOW <= p <= UNSURE_HIGH``.
``threshold_sensitivity``
    per kept detection, how much the mask changes between the mask thresholds ``LOW_MASK``
    and ``HIGH_MASK``: ``1 - IoU`` of the two in the grid.
``rare_class``
    per kept detection, how rare its class is among the run's kept detections:
    ``1 - log(1 + n_class) / log(1 + n_most_common)`` (0 for the most common class).

An image's priority is the sum of its four signals. Runs without soft masks
(``--no-soft-masks``) have no mask signals (0). Tiled images use each detection's best
part's soft mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIGNALS = ("borderline", "mask_uncertainty", "threshold_sensitivity", "rare_class")
UNSURE_LOW, UNSURE_HIGH = 0.25, 0.75
LOW_MASK, HIGH_MASK = 0.3, 0.7
DEFAULT_MARGIN = 0.15
#: What one detection's value of each signal measures, in words (each is 0..1; an image's is
#: the sum over its detections).
SIGNAL_UNITS = {
    "borderline": "closeness of a score to the threshold (1 at it, 0 at the margin)",
    "mask_uncertainty": f"share of a kept mask's box with probability {UNSURE_LOW:g}-{UNSURE_HIGH:g}",
    "threshold_sensitivity": f"1 - IoU of a kept mask at mask thresholds {LOW_MASK:g} and {HIGH_MASK:g}",
    "rare_class": "rarity of a kept detection's class in the run (0: the commonest)",
}


@dataclass(frozen=True)
class SignalSettings:
    """The threshold signals are measured against, and the borderline band around it."""

    score_threshold: float = 0.5
    margin: float = DEFAULT_MARGIN


def borderline_weights(scores: np.ndarray, settings: SignalSettings) -> np.ndarray:
    """Each detection's ``w``: how close its score is to the threshold (0 outside the band)."""
    return np.clip(1.0 - np.abs(scores - settings.score_threshold) / settings.margin, 0.0, 1.0)


def mask_uncertainty(soft: np.ndarray) -> np.ndarray:
    """Per soft mask (``[N, M, M]``), the share of its grid with ``UNSURE_LOW <= p <= UNSURE_HIGH``."""
    if soft.size == 0:
        return np.zeros(len(soft))
    unsure = (soft >= UNSURE_LOW) & (soft <= UNSURE_HIGH)
    return unsure.reshape(len(soft), -1).mean(axis=1)


def threshold_sensitivity(soft: np.ndarray) -> np.ndarray:
    """Per soft mask, ``1 - IoU`` of the mask at ``LOW_MASK`` and at ``HIGH_MASK`` (0 for a mask
    empty at both)."""
    if soft.size == 0:
        return np.zeros(len(soft))
    low = (soft >= LOW_MASK).reshape(len(soft), -1)
    high = (soft >= HIGH_MASK).reshape(len(soft), -1)
    union = low.sum(axis=1)   # high is inside low
    inter = high.sum(axis=1)
    return np.where(union > 0, 1.0 - inter / np.maximum(union, 1), 0.0)


def rarity(class_counts: np.ndarray) -> np.ndarray:
    """Per class, ``1 - log(1 + n) / log(1 + n_max)`` from its kept detections ``n``."""
    most = class_counts.max() if class_counts.size else 0
    if most <= 1:
        return np.zeros(len(class_counts))
    return 1.0 - np.log1p(class_counts) / np.log1p(most)

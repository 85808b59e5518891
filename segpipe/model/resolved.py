"""The weights a run names, resolved in the driver into what its model family runs
(``families``): the payload for the predictor actors, the spec it fits, its categories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from segpipe.config import ConfigError
from segpipe.model.categories import Category, CategoryTable
from segpipe.model.families import implementation
from segpipe.model.spec import ModelSpec


@dataclass
class ResolvedWeights:
    """What the driver resolved the weights to: the ``payload`` the predictor actors build the
    model from (a state dict, or what the family needs), the model spec it fits (classes and
    masks from the weights), the category table of its classes, and what identifies it in the
    manifest."""

    kind: str                      # "pretrained" | "url" | "file" | "folder" | "random"
    name: str                      # weights enum member, URL, path, or "random(seed=N)"
    sha256: str
    payload: Any
    spec: ModelSpec
    categories: CategoryTable
    warnings: list[str] = field(default_factory=list)

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256,
                "num_classes": self.spec.num_classes, "categories": self.categories.origin,
                "warnings": self.warnings}


def resolve_weights(weights: Any, spec: ModelSpec, seed: int = 0,
                    categories: Optional[tuple[Category, ...]] = None,
                    show_progress: bool = False, tiled: bool = False) -> ResolvedWeights:
    """Turn the ``weights`` setting (or a ``weights.WeightsSource``) into what the family of
    ``spec.arch`` runs (its ``resolve``); ``ConfigError`` for anything that cannot run, a
    ``tiled`` run (``--tile``) of masks over the whole image included."""
    from segpipe.model.weights import WeightsSource, weights_source  # the network, on use

    source = weights if isinstance(weights, WeightsSource) else \
        weights_source(weights, spec.arch, seed)
    resolved = implementation(spec.arch).resolve(source, spec, seed, categories, show_progress)
    if tiled and resolved.spec.has_masks and resolved.spec.mask_frame is not None:
        raise ConfigError(f"--tile cannot slice the masks of --arch {spec.arch} (weights "
                          f"{source.name}): they are made over the whole image; run without "
                          "--tile, or with a box-only model")
    return resolved

"""Build torchvision's Mask R-CNN and resolve its weights (pretrained, seeded random, or a file).

Weights are resolved once, in the driver, before any image is read: a missing pretrained file
fails the run at once with the file name and the folder to put it in. The resolved state dict
then travels to every predictor actor through Ray's object store, so nodes need no cache.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models._api import WeightsEnum

from segpipe.categories import NUM_MODEL_CLASSES
from segpipe.config import ConfigError, ModelSpec

_BUILDERS: dict[str, tuple[Callable[..., MaskRCNN], WeightsEnum]] = {
    "maskrcnn_resnet50_fpn": (maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "maskrcnn_resnet50_fpn_v2": (maskrcnn_resnet50_fpn_v2, MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: this run used seeded random-initialised weights; its "
                          "detections are meaningless and only exercise the pipeline")


def build_model(spec: ModelSpec) -> MaskRCNN:
    """Build the architecture with no weights loaded (randomly initialised), in eval mode."""
    builder, _ = _BUILDERS[spec.arch]
    model = builder(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_MODEL_CLASSES,
        min_size=spec.min_size,
        max_size=spec.max_size,
        box_score_thresh=spec.score_floor,
        box_nms_thresh=spec.nms_threshold,
        box_detections_per_img=spec.detections_per_image,
        rpn_post_nms_top_n_test=spec.proposals_per_image,
    )
    return model.eval()


@dataclass
class ResolvedWeights:
    """A state dict with what identifies it in the manifest."""

    kind: str                      # "pretrained" | "random" | "file"
    name: str                      # weights enum name, "random(seed=N)", or the file path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    warning: Optional[str] = None

    def identity(self) -> dict[str, Optional[str]]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256,
                "warning": self.warning}


def pretrained_weights_file(arch: str) -> Path:
    """Where torchvision's cache keeps the pretrained file for ``arch`` (honours TORCH_HOME)."""
    _, weights = _BUILDERS[arch]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def resolve_weights(weights: str, spec: ModelSpec, seed: int = 0) -> ResolvedWeights:
    """Turn the ``weights`` setting into a state dict that fits ``spec.arch``.

    Raises ``ConfigError`` when the pretrained file is neither cached nor downloadable, when a
    checkpoint file is missing or unreadable, or when it does not fit the architecture.
    """
    if weights == "pretrained":
        resolved = _pretrained(spec.arch)
    elif weights == "random":
        resolved = _random(spec, seed)
    else:
        resolved = _from_file(Path(weights))
    check_fits(resolved.state_dict, spec, source=resolved.name)
    return resolved


def _pretrained(arch: str) -> ResolvedWeights:
    _, weights = _BUILDERS[arch]
    path = pretrained_weights_file(arch)
    if not path.is_file():
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except Exception as exc:
            raise ConfigError(
                f"pretrained weights for {arch} are not in the torchvision cache and could not be "
                f"downloaded ({type(exc).__name__}: {exc}). Put the file {path.name} "
                f"(from {weights.url}) into {path.parent}/ (set TORCH_HOME to use another cache "
                "folder), or pass --weights PATH to a state_dict checkpoint"
            ) from None
    state = _load_checkpoint(path)
    return ResolvedWeights("pretrained", f"{type(weights).__name__}.{weights.name}",
                           _file_sha256(path), state)


def _random(spec: ModelSpec, seed: int) -> ResolvedWeights:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_model(spec).state_dict()
    return ResolvedWeights("random", f"random(seed={seed})", state_dict_sha256(state), state,
                           warning=RANDOM_WEIGHTS_WARNING)


def _from_file(path: Path) -> ResolvedWeights:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist (--weights takes pretrained, "
                          "random or the path of a state_dict checkpoint)")
    return ResolvedWeights("file", str(path), _file_sha256(path), _load_checkpoint(path))


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; accept ``{"model": state_dict}`` too."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load weights file {path} as a safe (weights_only) torch "
                          f"checkpoint: {type(exc).__name__}: {exc}") from None
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"weights file {path} holds no state_dict (a dict of tensors)")
    return loaded


def check_fits(state_dict: dict[str, torch.Tensor], spec: ModelSpec, source: str) -> None:
    """Raise ``ConfigError`` unless ``state_dict`` loads strictly into ``spec.arch``."""
    model = build_model(spec)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise ConfigError(f"weights {source} do not fit {spec.arch} with {NUM_MODEL_CLASSES} COCO "
                          f"classes: {' '.join(detail[:4])[:600]}") from None


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Build torchvision's detectors (the R-CNN family, ``rcnn``) and read their checkpoints: the
architecture their keys say and the classes they predict.

Weights are resolved once, in the driver, before any image is read: a pretrained file missing
from torch's cache is downloaded or the run fails at once (``segpipe.weights``); a checkpoint
file is loaded with ``torch.load(..., weights_only=True)`` and inspected. Its keys say which
architecture it is (a v1 checkpoint given ``--arch ..._v2`` is refused, naming the right flag)
and its box predictor says how many classes it has; the categories file must name exactly that
many. The resolved state dict then travels to every predictor actor through Ray's object
store, so cluster nodes need no cache.
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path
from typing import Callable, Optional

import torch
from torchvision.models import detection
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from segpipe.config import ConfigError
from segpipe.model.families import family_of
from segpipe.model.spec import ModelSpec

#: torchvision's constructor of each architecture of the family.
ARCHES: tuple[str, ...] = family_of("maskrcnn_resnet50_fpn").arches
_BUILDERS: dict[str, Callable[..., GeneralizedRCNN]] = {
    arch: getattr(detection, arch) for arch in ARCHES}

#: Keys whose rows are the classes: (box classifier, mask classifier).
CLASS_ROWS_KEY = "roi_heads.box_predictor.cls_score.weight"
MASK_ROWS_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"

def build_model(spec: ModelSpec) -> GeneralizedRCNN:
    """Build the architecture with no weights loaded (randomly initialised), in eval mode."""
    model = _BUILDERS[spec.arch](
        weights=None,
        weights_backbone=None,
        num_classes=spec.num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        box_score_thresh=spec.score_floor,
        box_nms_thresh=spec.nms_threshold,
        box_detections_per_img=spec.detections_per_image,
        rpn_post_nms_top_n_test=spec.proposals_per_image,
    )
    return model.eval()


def _build_on_meta(spec: ModelSpec) -> GeneralizedRCNN:
    """``build_model`` with no memory and no initialisation: every parameter and buffer on
    torch's meta device (the anchor templates, which are neither, are made on the CPU)."""
    with torch.device("meta"):
        return build_model(spec)


def build_loaded_model(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> GeneralizedRCNN:
    """The architecture of ``spec`` holding ``state_dict``, in eval mode, on the CPU.

    Built on the meta device, given memory, then loaded strictly: torchvision's random
    initialisation (about a second on two cores, in every predictor actor's start) is skipped,
    and nothing is left uninitialised, since every parameter and buffer of these models is a
    state-dict key that a strict load sets (``tests/test_weights.py`` checks each
    architecture)."""
    model = _build_on_meta(spec).to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True)
    return model


def read_checkpoint_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read weights file {path}: {exc.strerror or exc}") from None


def load_checkpoint(path: Path, data: Optional[bytes] = None) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True`` (from ``data``, the file's bytes, when
    given); accept it under a ``model`` or ``state_dict`` key (training checkpoints) and with
    DataParallel's ``module.`` prefix."""
    try:
        loaded = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu",
                            weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load weights file {path} as a safe (weights_only) torch "
                          f"checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                          ) from None
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded or \
            not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"weights file {path} holds no state_dict (a dict of tensors, bare or "
                          "under a 'model' or 'state_dict' key)")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return loaded


def _normal_keys(keys) -> frozenset[str]:
    """Keys as today's torchvision names them, without BatchNorm's ``num_batches_tracked``
    (torchvision's pretrained files use frozen BatchNorm and an older RPN head naming)."""
    renamed = {"rpn.head.conv.weight": "rpn.head.conv.0.0.weight",
               "rpn.head.conv.bias": "rpn.head.conv.0.0.bias"}
    return frozenset(renamed.get(k, k) for k in keys if not k.endswith("num_batches_tracked"))


@functools.lru_cache(maxsize=None)
def architecture_keys(arch: str) -> frozenset[str]:
    """The state-dict keys of ``arch`` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = _BUILDERS[arch](weights=None, weights_backbone=None, num_classes=2)
    return _normal_keys(model.state_dict())


def checkpoint_architectures(state_dict: dict) -> list[str]:
    """The architectures whose keys are exactly the checkpoint's."""
    keys = _normal_keys(state_dict)
    return [arch for arch in ARCHES if architecture_keys(arch) == keys]


def checkpoint_classes(state_dict: dict, arch: str, source: str) -> int:
    """Classes (background included) of a checkpoint for ``arch``; ``ConfigError`` when its keys
    are another architecture's or its box and mask predictors disagree."""
    keys = _normal_keys(state_dict)
    if keys != architecture_keys(arch):
        others = [a for a in checkpoint_architectures(state_dict) if a != arch]
        if others:
            raise ConfigError(f"weights {source} are a {others[0]} checkpoint, not "
                              f"{arch}: pass --arch {others[0]}")
        expected = architecture_keys(arch)
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise ConfigError(f"weights {source} are not a torchvision {arch} state dict: "
                          f"{len(missing)} keys missing (e.g. {', '.join(missing[:3]) or '-'}), "
                          f"{len(extra)} unexpected (e.g. {', '.join(extra[:3]) or '-'})")
    classes = int(state_dict[CLASS_ROWS_KEY].shape[0])
    if MASK_ROWS_KEY in state_dict and int(state_dict[MASK_ROWS_KEY].shape[0]) != classes:
        raise ConfigError(f"weights {source}: the box predictor has {classes} classes but the "
                          f"mask predictor has {int(state_dict[MASK_ROWS_KEY].shape[0])}; both "
                          "heads must be trained for the same classes")
    if classes < 2:
        raise ConfigError(f"weights {source}: the box predictor has {classes} class; a detector "
                          "needs background and at least one class")
    return classes


def check_fits(state_dict: dict[str, torch.Tensor], spec: ModelSpec, source: str) -> None:
    """Raise ``ConfigError`` unless ``state_dict`` loads strictly into ``spec``'s model (built
    on the meta device: the keys and shapes are checked, nothing is copied)."""
    model = _build_on_meta(spec)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).splitlines()[:4])[:600]
        raise ConfigError(f"weights {source} do not fit {spec.arch} with {spec.num_classes} "
                          f"classes: {detail}") from None


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

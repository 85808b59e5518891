"""Build torchvision's detectors and load the weights a run names, with the classes they predict.

Weights are resolved once, in the driver, before any image is read: a pretrained file missing
from torch's cache is downloaded or the run fails at once (``segpipe.weights``); a checkpoint
file is loaded with ``torch.load(..., weights_only=True)`` and inspected. Its keys say which
architecture it is (a v1 checkpoint given ``--arch ..._v2`` is refused, naming the right flag)
and its box predictor says how many classes it has; the categories file must name exactly that
many. The resolved state dict then travels to every predictor actor through Ray's object
store, so cluster nodes need no cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torchvision.models import detection
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from segpipe.config import ARCHITECTURES, ConfigError
from segpipe.model.categories import (
    Category,
    CategoryError,
    CategoryTable,
    table_for,
    unnamed_classes_warning,
)
from segpipe.model.spec import ModelSpec
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE, WeightsSource, check_hash, fetch, weights_source

_BUILDERS: dict[str, Callable[..., GeneralizedRCNN]] = {
    arch: getattr(detection, arch) for arch in ARCHITECTURES}

#: Keys whose rows are the classes: (box classifier, mask classifier).
CLASS_ROWS_KEY = "roi_heads.box_predictor.cls_score.weight"
MASK_ROWS_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"

RANDOM_WEIGHTS_WARNING = RANDOM_WEIGHTS_NOTE


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


@dataclass
class ResolvedWeights:
    """A state dict, the model spec it fits (``num_classes`` from the checkpoint), the category
    table of its classes, and what identifies it in the manifest."""

    kind: str                      # "pretrained" | "url" | "file" | "random"
    name: str                      # weights enum member, URL, file path, or "random(seed=N)"
    sha256: str
    state_dict: dict[str, torch.Tensor]
    spec: ModelSpec
    categories: CategoryTable
    warnings: list[str] = field(default_factory=list)

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256,
                "num_classes": self.spec.num_classes, "categories": self.categories.origin,
                "warnings": self.warnings}


def resolve_weights(weights: Union[str, WeightsSource], spec: ModelSpec, seed: int = 0,
                    categories: Optional[tuple[Category, ...]] = None,
                    show_progress: bool = False) -> ResolvedWeights:
    """Turn the ``weights`` setting into a state dict, the spec it fits and its categories.

    Raises ``ConfigError`` when a file is missing, unreadable, of another architecture, or has
    another number of classes than ``categories`` names; when pretrained weights are neither
    cached nor downloadable.
    """
    source = weights if isinstance(weights, WeightsSource) else \
        weights_source(weights, spec.arch, seed)
    if source.kind == "random":
        num_classes = len(categories) + 1 if categories is not None else spec.num_classes
        spec = dataclasses.replace(spec, num_classes=num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = build_model(spec).state_dict()
        sha256 = state_dict_sha256(state)
    else:
        fetch(source, show_progress=show_progress)
        data = read_checkpoint_bytes(source.path)   # hashed and loaded from the same bytes
        sha256 = hashlib.sha256(data).hexdigest()
        if source.url is not None:
            check_hash(source.path, sha256)
        state = load_checkpoint(source.path, data)
        spec = dataclasses.replace(spec, num_classes=checkpoint_classes(state, spec.arch, source.name))
        check_fits(state, spec, source.name)
    try:
        table = table_for(spec.num_classes, categories)
    except CategoryError as exc:
        raise ConfigError(f"{exc} (weights {source.name})") from None
    warnings = [RANDOM_WEIGHTS_WARNING] if source.kind == "random" else []
    stored = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                     if v.is_floating_point() and v.dtype != torch.float32})
    if stored:
        warnings.append(f"the checkpoint stores its weights as {', '.join(stored)}: they are "
                        "widened to float32 for the model, and what was lost when they were "
                        "saved stays lost (predictions may differ from the float32 original)")
    if unnamed_classes_warning(table):
        warnings.append(unnamed_classes_warning(table))
    return ResolvedWeights(source.kind, source.name, sha256, state, spec, table, warnings)


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
    return [arch for arch in ARCHITECTURES if architecture_keys(arch) == keys]


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
    """Raise ``ConfigError`` unless ``state_dict`` loads strictly into ``spec``'s model."""
    model = build_model(spec)
    try:
        model.load_state_dict(state_dict, strict=True)
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

"""Mixed precision for torchvision's detectors: the network in bf16 or fp16, every box decode,
anchor, NMS input and mask probability in fp32 (detectron2's rule).

torchvision's detection code is not precision-safe under autocast:

* ``BoxCoder.decode_single`` casts the reference boxes (anchors, proposals) to the dtype of
  the regression output, so boxes are decoded on a bf16 grid (4 px steps past 512 px) and NMS
  then runs on those boxes and on low-precision scores;
* ``AnchorGenerator`` builds its anchors in the dtype of the feature maps and keeps the
  converted ``cell_anchors`` for every later call;
* ``maskrcnn_inference`` takes the sigmoid of low-precision mask logits.

``install_fp32_islands`` fixes all of them without changing torchvision's code or the state
dict's keys: forward hooks hand fp32 outputs from the RPN head, the box predictor and the mask
predictor (so decoding, softmax, NMS and sigmoid run in fp32), and a pre-hook gives the anchor
generator fp32 stand-ins for the feature maps (same shapes, no copy). The backbone, FPN, RPN
convolutions, RoIAlign and both heads' layers stay in low precision, where the time goes.
How far low precision lands from fp32, stage by stage, is measured by
``bench/precision_stages.py`` (the tests and the GPU bench use it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList

#: The low precisions and their torch dtypes; "fp32" runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32).

    fp16 on CPU is refused: CPU autocast has no fp16 kernels worth using, and the run would be
    slower than fp32 (``cluster.plan.plan_stages`` refuses it before any work starts)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 runs on CUDA GPUs only; use bf16 on CPU")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def as_fp32(value: Any) -> Any:
    """``value`` with every floating tensor in it (nested in lists, tuples and dicts) as
    float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: as_fp32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_fp32(v) for v in value)
    return value


def _fp32_outputs(module, inputs, output):
    return as_fp32(output)


def _fp32_feature_shapes(module, args):
    image_list, feature_maps = args
    stand_ins = [f if f.dtype == torch.float32 else
                 torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape)
                 for f in feature_maps]
    return image_list, stand_ins


def install_fp32_islands(model: GeneralizedRCNN) -> list[RemovableHandle]:
    """Make ``model`` precision-safe under autocast (see the module docstring); idempotent.

    Returns the hook handles (``handle.remove()`` undoes it, which only tests do). In fp32 the
    hooks change nothing: every output they touch is fp32 already."""
    if getattr(model, "_segpipe_fp32_islands", None):
        return model._segpipe_fp32_islands
    handles = [model.rpn.anchor_generator.register_forward_pre_hook(_fp32_feature_shapes),
               model.rpn.head.register_forward_hook(_fp32_outputs),
               model.roi_heads.box_predictor.register_forward_hook(_fp32_outputs)]
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        handles.append(model.roi_heads.mask_predictor.register_forward_hook(_fp32_outputs))
    model._segpipe_fp32_islands = handles
    return handles


def remove_fp32_islands(model: GeneralizedRCNN) -> None:
    for handle in getattr(model, "_segpipe_fp32_islands", None) or []:
        handle.remove()
    model._segpipe_fp32_islands = None


def uses_channels_last(device: torch.device, precision: str) -> bool:
    """Whether the backbone runs in channels_last: measured faster in bf16 on AMX CPUs and in
    fp16/bf16 on GPUs (docs/benchmarks.md); fp32 keeps torchvision's layout, bit for bit."""
    return precision != "fp32"


def prepare_model(model: GeneralizedRCNN, device: torch.device,
                  precision: str) -> GeneralizedRCNN:
    """Move ``model`` to ``device`` for inference at ``precision``: fp32 islands always (a
    no-op in fp32), channels_last where ``uses_channels_last`` says so."""
    model.to(device)
    install_fp32_islands(model)
    if uses_channels_last(device, precision):
        model.backbone.to(memory_format=torch.channels_last)
    return model


def run_network(model: GeneralizedRCNN, image_list: ImageList, precision: str
                ) -> list[dict[str, torch.Tensor]]:
    """Backbone, RPN and RoI heads on a padded batch (torchvision's order), at ``precision``;
    detections in the resized images' pixels. The batch comes in the memory layout
    ``uses_channels_last`` asks for (``inference.pad_batch`` lays it out while padding)."""
    tensors = image_list.tensors
    with autocast(tensors.device, precision):
        features = model.backbone(tensors)
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    return detections

"""The model families segpipe runs, and the one seam each plugs into.

A family is one module and one line of ``FAMILIES``. Its module defines

* ``resolve(source, spec, seed, categories, show_progress) -> resolved.ResolvedWeights``: in the
  driver, before any image is read: read and check the weights (``weights.WeightsSource``),
  the classes they predict and the run's category table; ``ConfigError`` for anything that
  cannot run;
* ``Detector(spec, payload, device, precision, canvas)``: built once in each predictor actor
  from the ``payload`` ``resolve`` made; ``predict(images, resize)`` takes ``H×W×3`` uint8
  RGB images (decoded as ``io.decode`` decodes them; ``resize[k]`` false: a tile, predicted
  at its own resolution) and returns one ``detections.ImageDetections`` per image: boxes in image pixels,
  labels (1.. for the run's categories), scores, and soft masks (``MASK_FRAME``: ``None``,
  the box-relative M×M masks R-CNN's head gives; or the name of a frame of
  ``model.grids``, masks over the image at the model's mask resolution). A family whose
  ``Family.device_images`` is true also takes ``H×W×3`` uint8 tensors on its device there:
  the JPEGs ``decode: predictor`` decodes on the device (``model.jpeg``).

Everything after the seam (paste and RLE, predictions/, COCO, the label formats, review,
tiles, the actor pool, the API's ``Predictor``) is the same for every family. A family's
module is imported only when a run uses it: its library (an optional extra) loads only then.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

from segpipe.config import ConfigError


@dataclass(frozen=True)
class Family:
    """A family: its name, the module that runs it, the ``--arch`` names it answers to (those of
    ``masked`` always predict masks; for the others the weights say), and the pip extra its
    library (the module ``library``) comes with (None: segpipe's own dependencies);
    ``weights_folder``: its ``--weights`` is a folder (else a file); ``device_images``: its
    detector takes images decoded on its device (``decode: predictor``)."""

    name: str
    module: str
    arches: tuple[str, ...]
    masked: tuple[str, ...] = ()
    extra: Optional[str] = None
    library: Optional[str] = None
    weights_folder: bool = False
    device_images: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("torchvision", "segpipe.model.rcnn",
           ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn",
            "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn"),
           masked=("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"), device_images=True),
    Family("ultralytics", "segpipe.model.yolo", ("ultralytics",), extra="ultralytics",
           library="ultralytics"),
    Family("transformers", "segpipe.model.huggingface", ("transformers",), extra="transformers",
           library="transformers", weights_folder=True),
)

#: Every ``--arch`` name, the default (torchvision's Mask R-CNN) first.
ARCHITECTURES: tuple[str, ...] = tuple(arch for family in FAMILIES for arch in family.arches)


def family_of(arch: str) -> Family:
    """The family ``arch`` belongs to; ``ConfigError`` (with the closest name) for none."""
    for family in FAMILIES:
        if arch in family.arches:
            return family
    close = difflib.get_close_matches(arch, ARCHITECTURES, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}{hint}")


def check_installed(arch: str) -> None:
    """``ConfigError`` in one line when the library of ``arch``'s family (an optional extra)
    is not installed; imports nothing."""
    family = family_of(arch)
    if family.library is not None and importlib.util.find_spec(family.library) is None:
        raise _missing_extra(arch, family)


def check_decode(arch: str, decode: str) -> None:
    """``ConfigError`` in one line when ``decode: predictor`` is asked of a family whose
    detector takes host images only (its library's own preprocessing works on them)."""
    family = family_of(arch)
    if decode == "predictor" and not family.device_images:
        able = ", ".join(f.name for f in FAMILIES if f.device_images)
        raise ConfigError(f"decode predictor needs a detector that takes images on its device "
                          f"({able}); --arch {arch} ({family.name}) takes them from the host: "
                          "use --decode cpu")


def implementation(arch: str) -> ModuleType:
    """The module of ``arch``'s family; ``ConfigError`` in one line when its library (an
    optional extra) is not installed."""
    family = family_of(arch)
    try:
        return importlib.import_module(family.module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if family.extra is None or missing != family.library:
            raise   # not the extra's library: a real error, shown as it is
        raise _missing_extra(arch, family) from None


def _missing_extra(arch: str, family: Family) -> ConfigError:
    return ConfigError(f"--arch {arch} needs the {family.library} library, which is not "
                       f"installed: pip install 'segpipe[{family.extra}]'")

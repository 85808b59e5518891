"""What predictions depend on besides the weights: ``ModelSpec`` (architecture, sizes,
thresholds) and ``TileSettings`` (how huge images are sliced)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from segpipe.config import SegmentConfig, tile_overlap_pixels
from segpipe.model.families import family_of


@dataclass(frozen=True)
class ModelSpec:
    """The model settings that change predictions (everything but the weights).

    ``num_classes`` is the classifier's outputs, background included (91 for COCO); it comes
    from the checkpoint, not from the config, as does ``masks`` for families whose weights say
    whether they predict masks (None: the architecture says). ``image_size``: the input size
    of families that take one (``config.image_size``; None: the model's own). ``mask_frame``:
    how the family's masks are made from its soft masks (``model.grids.FRAMES``; None:
    R-CNN's box-relative M×M masks, ``encode.paste``), the family's ``MASK_FRAME``.
    """

    arch: str
    min_size: int
    max_size: int
    score_floor: float
    nms_threshold: float
    detections_per_image: int
    proposals_per_image: int
    num_classes: int = 91
    masks: Optional[bool] = None
    image_size: Optional[int] = None
    mask_frame: Optional[str] = None

    @property
    def has_masks(self) -> bool:
        return self.masks if self.masks is not None else has_masks(self.arch)

    @classmethod
    def from_config(cls, config: SegmentConfig, num_classes: int = 91) -> "ModelSpec":
        return cls(config.arch, config.min_size, config.max_size, config.score_floor,
                   config.nms_threshold, config.detections_per_image, config.proposals_per_image,
                   num_classes, image_size=config.image_size)


def has_masks(arch: str) -> bool:
    """True for the architectures that always predict instance masks (Mask R-CNN)."""
    return arch in family_of(arch).masked


@dataclass(frozen=True)
class TileSettings:
    """How a run slices its images (``--tile``); ``overlap`` in pixels."""

    size: int
    overlap: int
    full_pass: bool = False
    merge_threshold: float = 0.5
    join_seams: bool = True

    @classmethod
    def from_config(cls, config: SegmentConfig) -> Optional["TileSettings"]:
        """The run's tiling, or ``None`` without ``--tile``."""
        if not config.tile:
            return None
        return cls(config.tile, tile_overlap_pixels(config.tile, config.tile_overlap),
                   config.tile_full_pass, config.tile_merge_threshold, config.tile_join_seams)

    def applies(self, height: int, width: int) -> bool:
        """Whether an image of this size is sliced (its longer side is over the tile)."""
        return max(height, width) > self.size

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

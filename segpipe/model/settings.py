"""What a run's predictions depend on besides the images: ``RunSettings``, kept in the metadata of
every Parquet file of predictions/ (``schema.RUN_SETTINGS_KEY``), so that predictions/ can be
re-exported, resumed and checked without run.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from segpipe.model.categories import COCO_TABLE, CategoryTable
from segpipe.model.spec import ModelSpec, TileSettings
from segpipe.schema import (
    IMAGE_IDS,
    IMAGE_IDS_BEFORE,
    RUN_SETTINGS_KEY,
    SOFT_MASK_DTYPE,
    SOFT_MASK_DTYPE_BEFORE,
)


@dataclass(frozen=True)
class RunSettings:
    """The settings that predictions/ depend on, stored in every Parquet file's metadata.

    ``categories`` is the run's category table (which category each model label is); files
    written before tables were recorded read as COCO's. ``soft_mask_dtype`` is how the soft
    masks are stored (``schema.SOFT_MASK_DTYPE``); files written before it was recorded hold
    uint8. ``tiles`` is the run's tiling (``--tile``), None untiled. ``random_weights``: the
    run used ``--weights random`` (``weights.RANDOM_WEIGHTS_NOTE``; files written before it was
    recorded read as False).
    """

    model: ModelSpec
    weights_sha256: str
    mask_threshold: float
    soft_masks: bool
    categories: CategoryTable = COCO_TABLE
    image_ids: str = IMAGE_IDS
    soft_mask_dtype: str = SOFT_MASK_DTYPE
    tiles: Optional[TileSettings] = None
    random_weights: bool = False

    def to_json(self) -> dict:
        return {"model": asdict(self.model), "weights_sha256": self.weights_sha256,
                "mask_threshold": self.mask_threshold, "soft_masks": self.soft_masks,
                "categories": self.categories.to_json(), "image_ids": self.image_ids,
                "soft_mask_dtype": self.soft_mask_dtype,
                "tiles": self.tiles.to_json() if self.tiles else None,
                "random_weights": self.random_weights}

    def to_metadata(self) -> dict[bytes, bytes]:
        return {RUN_SETTINGS_KEY: json.dumps(self.to_json(), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: Optional[dict]) -> Optional["RunSettings"]:
        raw = (metadata or {}).get(RUN_SETTINGS_KEY)
        if not raw:
            return None
        values = json.loads(raw)
        values.setdefault("image_ids", IMAGE_IDS_BEFORE)
        values.setdefault("soft_mask_dtype", SOFT_MASK_DTYPE_BEFORE)
        categories = CategoryTable.from_json(values.pop("categories", None))
        tiles = values.pop("tiles", None)
        values["tiles"] = TileSettings(**tiles) if tiles else None
        return cls(model=ModelSpec(**values.pop("model")), categories=categories, **values)

    def differences(self, other: Optional["RunSettings"]) -> list[str]:
        """``"name: then -> now"`` for every setting in which ``other`` (earlier) differs."""
        def flat(s: "RunSettings") -> dict:
            return {**asdict(s.model), "weights_sha256": s.weights_sha256,
                    "mask_threshold": s.mask_threshold, "soft_masks": s.soft_masks,
                    "image_ids": s.image_ids, "soft_mask_dtype": s.soft_mask_dtype,
                    "tiles": s.tiles.to_json() if s.tiles else None}

        now, then = flat(self), (flat(other) if other else {})
        found = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in now.items()
                 if then.get(k) != v]
        if other is None or other.categories != self.categories:
            before = other.categories.describe() if other else None
            found.append(f"categories: {before} then, {self.categories.describe()} now")
        return found

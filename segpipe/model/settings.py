"""What a run's predictions depend on besides the images: ``RunSettings``, kept in the metadata of
every Parquet file of predictions/ (``schema.RUN_SETTINGS_KEY``), so that predictions/ can be
re-exported, resumed and checked without run.json."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass
from typing import NoReturn, Optional

from segpipe.config import SOFT_MASK_DTYPES, ConfigError, SegmentConfig, validate
from segpipe.model.categories import COCO_TABLE, MAX_CATEGORIES, CategoryTable
from segpipe.model.families import family_of
from segpipe.model.grids import FRAMES
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
        """The settings a prediction file's footer records; None when it records none.
        Anyone who can write a run folder can edit them: ``ConfigError`` in one line when
        they are not settings segpipe could have written (``check_recorded``)."""
        raw = (metadata or {}).get(RUN_SETTINGS_KEY)
        if not raw:
            return None
        try:
            values = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:   # RecursionError: nested past reason
            raise ConfigError(f"{DAMAGED_SETTINGS}: not JSON ({str(exc)[:100]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{DAMAGED_SETTINGS}: not a JSON object")
        values.setdefault("image_ids", IMAGE_IDS_BEFORE)
        values.setdefault("soft_mask_dtype", SOFT_MASK_DTYPE_BEFORE)
        check_recorded(values)
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


#: How a refusal of recorded settings begins.
DAMAGED_SETTINGS = "the run settings recorded with the predictions are damaged"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is no JSON number")


def _kind(value: object, kind: type, optional: bool = False) -> bool:
    if value is None:
        return optional
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_recorded(values: dict) -> None:
    """Refuse (``ConfigError``, one line naming the setting) recorded settings that segpipe
    could not have written: unknown or missing keys, values of another type, and values
    that ``config.validate`` refuses for a run (the same rules, so the two cannot drift)."""
    def refuse(why: str) -> NoReturn:
        raise ConfigError(f"{DAMAGED_SETTINGS}: {why}")

    fields = {f.name: f for f in dataclasses.fields(RunSettings)}
    model_fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    tile_fields = {f.name: f for f in dataclasses.fields(TileSettings)}
    for where, given, known in (("", values, fields),
                                ("model.", values.get("model"), model_fields),
                                ("tiles.", values.get("tiles"), tile_fields)):
        if given is None and where == "tiles.":
            continue
        if not isinstance(given, dict):
            refuse(f"{where.rstrip('.') or 'settings'} is not a mapping")
        unknown = sorted(set(given) - set(known))
        missing = sorted(name for name, f in known.items() if name not in given
                         and f.default is dataclasses.MISSING)
        if unknown or missing:
            refuse(", ".join([f"unknown {where}{n}" for n in unknown] +
                             [f"no {where}{n}" for n in missing]))
    model, tiles = values["model"], values.get("tiles")
    kinds = [("weights_sha256", values["weights_sha256"], str, False),
             ("mask_threshold", values["mask_threshold"], float, False),
             ("soft_masks", values["soft_masks"], bool, False),
             ("random_weights", values.get("random_weights", False), bool, False),
             ("model.arch", model["arch"], str, False),
             ("model.score_floor", model["score_floor"], float, False),
             ("model.nms_threshold", model["nms_threshold"], float, False),
             ("model.masks", model.get("masks"), bool, True),
             ("model.mask_frame", model.get("mask_frame"), str, True),
             ("model.image_size", model.get("image_size"), int, True)]
    kinds += [(f"model.{n}", model[n], int, False)
              for n in ("min_size", "max_size", "detections_per_image", "proposals_per_image")]
    kinds += [("model.num_classes", model.get("num_classes", 91), int, False)]
    if tiles is not None:
        kinds += [("tiles.size", tiles["size"], int, False),
                  ("tiles.overlap", tiles["overlap"], int, False),
                  ("tiles.full_pass", tiles.get("full_pass", False), bool, False),
                  ("tiles.merge_threshold", tiles.get("merge_threshold", 0.5), float, False),
                  ("tiles.join_seams", tiles.get("join_seams", True), bool, False)]
    for name, value, kind, optional in kinds:
        if not _kind(value, kind, optional):
            refuse(f"{name} is {value!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", values["weights_sha256"]):
        refuse(f"weights_sha256 is {values['weights_sha256']!r}")
    if tiles is not None and tiles["size"] < 1:
        refuse(f"tiles.size is {tiles['size']!r}")
    if values["image_ids"] not in (IMAGE_IDS, IMAGE_IDS_BEFORE):
        refuse(f"image_ids is {values['image_ids']!r}")
    if values["soft_mask_dtype"] not in (*SOFT_MASK_DTYPES, SOFT_MASK_DTYPE_BEFORE):
        refuse(f"soft_mask_dtype is {values['soft_mask_dtype']!r}")
    if model.get("mask_frame") is not None and model["mask_frame"] not in FRAMES:
        refuse(f"model.mask_frame is {model['mask_frame']!r}")
    if not 1 <= model.get("num_classes", 91) <= MAX_CATEGORIES + 1:
        refuse(f"model.num_classes is {model['num_classes']!r}")
    as_run = SegmentConfig(
        arch=model["arch"], min_size=model["min_size"], max_size=model["max_size"],
        score_floor=model["score_floor"], score_threshold=model["score_floor"],
        nms_threshold=model["nms_threshold"], detections_per_image=model["detections_per_image"],
        proposals_per_image=model["proposals_per_image"], image_size=model.get("image_size"),
        mask_threshold=values["mask_threshold"],
        tile=tiles["size"] if tiles else 0, tile_overlap=tiles["overlap"] if tiles else 0,
        tile_merge_threshold=tiles.get("merge_threshold", 0.5) if tiles else 0.5)
    try:
        validate(as_run, needs_paths=False)
        family_of(model["arch"])
    except ConfigError as exc:
        refuse(str(exc))

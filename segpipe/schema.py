"""The Parquet schema of ``OUTPUT/predictions`` and the columns passed between stages.

This is the one definition of the output table; the encode stage builds rows against it, the
sink writes it, export and the tests read it, and docs/output.md documents it.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from segpipe.config import SOFT_MASK_DTYPES

STATUS_OK = "ok"
STATUS_ERROR = "error"

#: Image ids are the first 53 bits of BLAKE2b of ``file_name``: the same on every rerun, and
#: exact in JSON (at most 2**53 - 1, the largest integer that JavaScript tools and jq keep).
#: Files written before this rule used 63 bits (``IMAGE_IDS_BEFORE``).
IMAGE_ID_BITS = 53
IMAGE_IDS = "blake2b-53"
IMAGE_IDS_BEFORE = "blake2b-63"

#: How soft masks are stored by default (``config.SOFT_MASK_DTYPES``); files written before the
#: kind was recorded stored uint8.
SOFT_MASK_DTYPE = SOFT_MASK_DTYPES[0]
SOFT_MASK_DTYPE_BEFORE = "uint8"

SEGMENTATION = pa.struct([
    pa.field("size", pa.list_(pa.int32())),   # [height, width], as COCO RLE has it
    pa.field("counts", pa.string()),           # compressed RLE string (pycocotools)
])

#: One part of a detection of a tiled image (``tiles.py``): what the model gave in one view.
DETECTION_PART = pa.struct([
    pa.field("box", pa.list_(pa.float32(), 4)),     # x1 y1 x2 y2 as predicted, view pixels
    pa.field("window", pa.list_(pa.int32(), 4)),    # the view: x0 y0 x1 y1 in image pixels
    pa.field("soft_mask", pa.binary()),             # as DETECTION's soft_mask
])

DETECTION = pa.struct([
    pa.field("category_id", pa.int32()),        # the run's category id of the predicted label
    pa.field("category_name", pa.string()),     # (CategoryTable; "N/A" for a label without one)
    pa.field("score", pa.float32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, width, height], image pixels
    pa.field("area", pa.int64()),               # pixels in the mask at the run's mask threshold;
                                                # null for box-only detectors
    pa.field("segmentation", SEGMENTATION),     # null for box-only detectors
    pa.field("box", pa.list_(pa.float32(), 4)),   # x1 y1 x2 y2 exactly as predicted (re-paste);
                                                # tiled images: the union of the parts' boxes
    pa.field("soft_mask", pa.binary()),         # M×M mask probabilities, row-major, as
                                                # RunSettings.soft_mask_dtype: uint16 (p·65535,
                                                # rounded), float32, or (runs before) uint8
                                                # (p·255); null with --no-soft-masks
                                                # and for tiled images (see parts);
                                                # with mask_grid: the grid crop's mask
                                                # logits, float16 (uint16's bytes) or float32
    pa.field("parts", pa.list_(DETECTION_PART)),  # tiled images only (--tile): what was
                                                # merged into this detection, best first;
                                                # its mask is the union of the parts'
                                                # (soft masks null with --no-soft-masks)
    pa.field("mask_grid", pa.list_(pa.int32(), 6)),  # families whose masks are over the image
                                                # (ModelSpec.mask_frame, model.grids):
                                                # grid_h grid_w x0 y0 x1 y1, the cells of the
                                                # model's mask map that soft_mask holds;
                                                # null for box-relative masks (R-CNN's M×M)
])

PREDICTION_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),   # stable: from file_name (IMAGE_IDS)
    pa.field("file_name", pa.string(), nullable=False),  # path relative to INPUT, '/' separators
    pa.field("width", pa.int32()),                      # after EXIF orientation; null on error
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),    # "ok" | "error"
    pa.field("error", pa.string()),                     # readable reason when status is "error"
    pa.field("detections", pa.list_(DETECTION)),        # score >= score floor; null on error
])

#: Key of the Parquet key-value metadata that records the run settings predictions depend on
#: (``RunSettings`` as JSON), so that predictions/ can be re-exported without run.json.
RUN_SETTINGS_KEY = b"segpipe.run"

def image_columns(batch: pa.Table, statuses: list, errors: list, widths: Optional[list] = None,
                  heights: Optional[list] = None) -> dict[str, pa.Array]:
    """The per-image columns every stage passes on: ids and names from ``batch``, the status
    and error as the stage leaves them, and the size (from ``batch`` unless given)."""
    return {
        "image_id": batch.column("image_id"),
        "file_name": batch.column("file_name"),
        "width": batch.column("width") if widths is None else pa.array(widths, pa.int32()),
        "height": batch.column("height") if heights is None else pa.array(heights, pa.int32()),
        "status": pa.array(statuses, pa.string()),
        "error": pa.array(errors, pa.string()),
    }


# Columns of the rows that flow between stages (not written anywhere).
# sources → decode: image_id, file_name, path, size
# decode → predictor: image_id, file_name, width, height, status, error, pixels (H*W*3 uint8)
#   and, with ``decode: predictor``, jpeg (the file's bytes where pixels are empty)
# predictor → encode: image_id, file_name, width, height, status, error, and per image the
#   packed detection arrays below (raw float32/int32 bytes, num_detections rows each).
PIXELS = "pixels"
JPEG = "jpeg"
NUM_DETECTIONS = "num_detections"
LABELS = "labels"          # int32[N]
SCORES = "scores"          # float32[N]
BOXES = "boxes"            # float32[N, 4], x1 y1 x2 y2 in original image pixels
SOFT_MASKS = "soft_masks"  # float32[N, M, M], the mask head's probabilities for the label;
                           # with MASK_GRIDS, each detection's crop of the mask logits
MASK_SIZE = "mask_size"    # M (0 with MASK_GRIDS)
MASK_GRIDS = "mask_grids"  # int32[N, 6] grid_h grid_w x0 y0 x1 y1 (model.grids), or empty
TILED = "tiled"            # bool: the rows below are parts of merged detections (tiles.py)
WINDOWS = "windows"        # int32[N, 4], each part's view x0 y0 x1 y1 (tiled images)
GROUPS = "groups"          # int32[N], the merged detection of each part (tiled images)

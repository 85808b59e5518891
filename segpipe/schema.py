"""The Parquet schema of ``OUTPUT/predictions`` and the columns passed between stages.

This is the one definition of the output table; the encode stage builds rows against it, the
sink writes it, export and the tests read it, and the README documents it.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

SEGMENTATION = pa.struct([
    pa.field("size", pa.list_(pa.int32())),   # [height, width], as COCO RLE has it
    pa.field("counts", pa.string()),           # compressed RLE string (pycocotools)
])

DETECTION = pa.struct([
    pa.field("category_id", pa.int32()),        # COCO id, as the model predicts it
    pa.field("category_name", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, width, height], image pixels
    pa.field("area", pa.int64()),               # pixels in the mask at the run's mask threshold
    pa.field("segmentation", SEGMENTATION),
])

PREDICTION_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),   # stable: derived from file_name
    pa.field("file_name", pa.string(), nullable=False),  # path relative to INPUT, '/' separators
    pa.field("width", pa.int32()),                      # after EXIF orientation; null on error
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),    # "ok" | "error"
    pa.field("error", pa.string()),                     # readable reason when status is "error"
    pa.field("detections", pa.list_(DETECTION)),        # score >= score floor; null on error
])

# Columns of the rows that flow between stages (not written anywhere).
# sources → decode: image_id, file_name, path, size
# decode → predictor: image_id, file_name, width, height, status, error, pixels (H*W*3 uint8)
# predictor → encode: image_id, file_name, width, height, status, error, and per image the
#   packed detection arrays below (raw float32/int32 bytes, num_detections rows each).
PIXELS = "pixels"
NUM_DETECTIONS = "num_detections"
LABELS = "labels"          # int32[N]
SCORES = "scores"          # float32[N]
BOXES = "boxes"            # float32[N, 4], x1 y1 x2 y2 in original image pixels
SOFT_MASKS = "soft_masks"  # float32[N, M, M], the mask head's probabilities for the label
MASK_SIZE = "mask_size"    # M

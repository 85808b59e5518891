"""Read a run's ``predictions/``: the image table, and ok rows streamed file by file."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segpipe import schema
from segpipe.io import storage
from segpipe.io.run_folder import (
    prediction_files,
)

IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "status", "error"]


def predictions_dataset(predictions_dir: str) -> pads.Dataset:
    """A pyarrow dataset over the complete prediction files of ``predictions_dir``."""
    fs, _ = storage.resolve(predictions_dir)
    return pads.dataset(prediction_files(predictions_dir), format="parquet", filesystem=fs,
                        schema=schema.PREDICTION_SCHEMA)


def read_image_table(predictions_dir: str) -> pa.Table:
    """One row per image (no detections), sorted by ``file_name``."""
    table = predictions_dataset(predictions_dir).to_table(columns=IMAGE_COLUMNS)
    return table.sort_by("file_name")


def iter_ok_rows(predictions_dir: str, batch_rows: int = 256,
                 soft_masks: bool = True) -> Iterator[dict]:
    """Yield every ok row (``image_id``, ``file_name``, size, ``detections``), streaming.

    Reads one file at a time, synchronously: pyarrow's dataset scanner reads ahead of a slow
    consumer (this loop converts to Python) and its peak memory grew with the dataset
    (measured: 436 MB for 160k detections, 710 MB for 480k); this stays flat. Without
    ``soft_masks`` the detections come without their stored soft masks (``soft_mask`` is
    None), which saves making a bytes object per detection when no mask is re-pasted.
    """
    for path in prediction_files(predictions_dir):
        yield from ok_rows_of_file(predictions_dir, path, batch_rows, soft_masks)


def ok_rows_of_file(predictions_dir: str, path: str, batch_rows: int = 256,
                    soft_masks: bool = True) -> Iterator[dict]:
    """``iter_ok_rows`` for one prediction file ``path`` of ``predictions_dir``."""
    fs, _ = storage.resolve(predictions_dir)
    columns = ["image_id", "file_name", "width", "height", "status", "detections"]
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            if not soft_masks:
                batch = without_soft_masks(batch)
            for row in batch.to_pylist():
                if row["status"] == schema.STATUS_OK:
                    yield row


def without_soft_masks(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every detection's ``soft_mask`` and ``parts`` (tiled images: what the
    masks are re-pasted from) null; the list's layout unchanged."""
    detections = batch.column("detections")
    structs = detections.values
    fields = [child if field.name not in ("soft_mask", "parts") else
              pa.nulls(len(structs), field.type)
              for field, child in zip(structs.type, structs.flatten())]
    stripped = pa.StructArray.from_arrays(fields, fields=list(structs.type),
                                          mask=structs.is_null())
    lists = pa.ListArray.from_arrays(detections.offsets, stripped,
                                     mask=detections.is_null())
    return batch.set_column(batch.schema.get_field_index("detections"), "detections", lists)

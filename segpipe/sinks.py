"""Write prediction rows to ``OUTPUT/predictions/*.parquet`` from Ray write tasks, atomically.

Each file is written under a temporary name and renamed into place once complete, so a file
named ``part-*.parquet`` is always whole. Files hold at most ``rows_per_file`` rows.
"""

from __future__ import annotations

import uuid
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from segpipe import schema, storage
from segpipe.config import ConfigError

PREDICTIONS_DIR = "predictions"
PART_SUFFIX = ".parquet"


def predictions_dir(output: str) -> str:
    """The predictions folder of a segment run's OUTPUT (a path or URI)."""
    return storage.join(output.rstrip("/"), PREDICTIONS_DIR)


def existing_predictions(output: str) -> str:
    """``predictions_dir(output)``; a ``ConfigError`` when it holds no prediction file."""
    directory = predictions_dir(output)
    if not prediction_files(directory):
        raise ConfigError(f"{directory} holds no prediction files; run `segpipe segment` into "
                          f"{output} first")
    return directory


def write_prediction_file(table: pa.Table, directory: str, settings: schema.RunSettings) -> str:
    """Write ``table`` as one new Parquet file in ``directory``; return its path.

    The file's metadata records ``settings``, so that the file describes how it was made.
    """
    fs, root = storage.resolve(directory)
    path = storage.join(root, f"part-{uuid.uuid4().hex}{PART_SUFFIX}")
    table = table.cast(schema.PREDICTION_SCHEMA).replace_schema_metadata(settings.to_metadata())
    with storage.atomic_output(fs, path) as stream:
        pq.write_table(table, stream, compression="zstd")
    return path


def read_written(directory: str) -> tuple[Optional[schema.RunSettings], set[int]]:
    """The settings recorded in the complete prediction files of ``directory`` and the
    ``image_id`` of every row in them, opening each file once (what ``--resume`` needs).

    Raises ``ValueError`` when files disagree (predictions of different runs mixed).
    """
    fs, _ = storage.resolve(directory)
    found: set[schema.RunSettings] = set()
    ids: set[int] = set()
    for path in prediction_files(directory):
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["image_id"])
        found.add(schema.RunSettings.from_metadata(table.schema.metadata))
        ids.update(table.column("image_id").to_pylist())
    return _one_settings(directory, found), ids


def read_run_settings(directory: str) -> Optional[schema.RunSettings]:
    """The settings recorded in the prediction files of ``directory``.

    Raises ``ValueError`` when files disagree (predictions of different runs mixed).
    """
    fs, _ = storage.resolve(directory)
    found: set[schema.RunSettings] = set()
    for path in prediction_files(directory):
        with fs.open_input_file(path) as f:
            found.add(schema.RunSettings.from_metadata(pq.read_schema(f).metadata))
    return _one_settings(directory, found)


def _one_settings(directory: str, found: set[schema.RunSettings]) -> Optional[schema.RunSettings]:
    if len(found) > 1:
        raise ValueError(f"{directory} mixes predictions made with different settings: {found}")
    return found.pop() if found else None


def prediction_files(directory: str) -> list[str]:
    """The complete prediction files under ``directory`` (temporary files are not listed)."""
    fs, root = storage.resolve(directory)
    return [i.path for i in storage.list_files(fs, root, PART_SUFFIX)
            if i.base_name.startswith("part-")]


class PredictionSink(Datasink[list]):
    """Ray Datasink: each write task writes its rows as one or more complete Parquet files."""

    def __init__(self, directory: str, rows_per_file: int, settings: schema.RunSettings):
        self.directory = directory
        self.rows_per_file = rows_per_file
        self.settings = settings

    def write(self, blocks: Iterable[Block], ctx) -> list:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        written = []
        for start in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(start, self.rows_per_file)
            written.append((write_prediction_file(part, self.directory, self.settings),
                            part.num_rows))
        return written

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WritePredictions"

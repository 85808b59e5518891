"""Write prediction rows to ``OUTPUT/predictions/*.parquet`` from Ray write tasks, atomically.

Each file is written under a temporary name and renamed into place once complete, so a file
named ``part-*.parquet`` is always whole (``segpipe.layout`` lists them). Files hold at most
``rows_per_file`` rows.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from segpipe import schema
from segpipe.io import storage
from segpipe.io.lease import check_holder
from segpipe.model.settings import RunSettings
from segpipe.output.run_folder import PART_PREFIX, PART_SUFFIX


def write_prediction_file(table: pa.Table, directory: str, settings: RunSettings,
                          fence: Optional[Callable[[], None]] = None) -> str:
    """Write ``table`` as one new Parquet file in ``directory``; return its path.

    The file's metadata records ``settings``, so that the file describes how it was made.
    ``fence`` is called before the file is committed; if it raises, nothing is committed.
    """
    fs, root = storage.resolve(directory)
    path = storage.join(root, f"{PART_PREFIX}{uuid.uuid4().hex}{PART_SUFFIX}")
    table = table.cast(schema.PREDICTION_SCHEMA).replace_schema_metadata(settings.to_metadata())
    with storage.atomic_output(fs, path, before_commit=fence) as stream:
        pq.write_table(table, stream, compression="zstd")
    return path


class PredictionSink(Datasink[list]):
    """Ray Datasink: each write task writes its rows as one or more complete Parquet files,
    each committed only while OUTPUT's lease names this run (``lease.check_holder``), when
    ``output`` and ``run_id`` are given."""

    def __init__(self, directory: str, rows_per_file: int, settings: RunSettings,
                 output: Optional[str] = None, run_id: Optional[str] = None):
        self.directory = directory
        self.rows_per_file = rows_per_file
        self.settings = settings
        self.output, self.run_id = output, run_id

    def _fence(self) -> None:
        if self.output is not None and self.run_id is not None:
            check_holder(self.output, self.run_id)

    def write(self, blocks: Iterable[Block], ctx) -> list:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        written = []
        for start in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(start, self.rows_per_file)
            written.append((write_prediction_file(part, self.directory, self.settings,
                                                  self._fence), part.num_rows))
        return written

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WritePredictions"

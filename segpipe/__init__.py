"""segpipe: segment large image datasets with Mask R-CNN on Ray Data and write COCO annotations.

The flow runs one way, a package per stage:
``io.sources`` (image files, tar shards, Parquet tables) → ``io.decode`` (CPU tasks) →
``model`` (an actor pool of Mask R-CNN predictors, ``model.stage``) → ``encode`` (CPU actors:
masks pasted into COCO RLE) → ``io.sinks`` (Parquet predictions) → ``coco`` (COCO JSON,
evaluation). ``cluster`` sizes the stages for a Ray cluster; ``commands`` wires them for each
command; ``cli`` parses a command line and ``api`` (the names below) is the way in from Python.

Importing segpipe imports neither torch nor Ray: the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segpipe.version import __version__

#: The public API: name -> the module that defines it.
_PUBLIC = {
    "segment": "segpipe.api", "Predictor": "segpipe.api", "write_predictions": "segpipe.api",
    "export": "segpipe.api", "to_coco": "segpipe.api", "ExportResult": "segpipe.api",
    "as_config": "segpipe.api", "export_labels": "segpipe.api", "LabelsResult": "segpipe.api",
    "review_queue": "segpipe.api",
    "SegmentConfig": "segpipe.config", "ConfigError": "segpipe.config",
    "load_config": "segpipe.config",
    "ExportCounts": "segpipe.annotations.selection",
    "run_segment": "segpipe.commands.segment", "RunReport": "segpipe.commands.report",
    "PREDICTION_SCHEMA": "segpipe.schema",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from segpipe.annotations.selection import ExportCounts
    from segpipe.api import (
        ExportResult,
        LabelsResult,
        Predictor,
        as_config,
        export,
        export_labels,
        review_queue,
        segment,
        to_coco,
        write_predictions,
    )
    from segpipe.commands.report import RunReport
    from segpipe.commands.segment import run_segment
    from segpipe.config import ConfigError, SegmentConfig, load_config
    from segpipe.schema import PREDICTION_SCHEMA


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")

"""Check that a segment run can start, before torch is imported or Ray started.

Everything that can be checked from the configuration and the files it names is checked here,
in about a second: values and their ranges, INPUT (it exists and holds images), OUTPUT (a folder
that can be written and holds no earlier run unless ``--resume``/``--overwrite``), the weights
file (present) and the categories file (readable, well formed). A mistake is a
``ConfigError`` naming what to fix; only then does the run pay for torch, Ray and the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from segpipe.config import SegmentConfig, validate
from segpipe.io import formats
from segpipe.io.lease import check_free as check_lease
from segpipe.model.categories import Category, load_categories
from segpipe.model.families import check_decode, check_installed
from segpipe.model.weights import WeightsSource, weights_source
from segpipe.output import run_folder


@dataclass
class CheckedRun:
    """What the checks found, for ``commands.segment.run_segment`` to use instead of looking again."""

    input_format: str                            # files | tar | parquet
    listing: Optional[pa.Table]                  # every image, for ``files`` inputs
    weights: WeightsSource
    categories: Optional[tuple[Category, ...]]   # from --categories, in file order
    seconds: float
    skipped: dict[str, list[str]] = field(default_factory=dict)   # INPUT files left out
    root: str = ""                                 # INPUT's folder
    tables: list[str] = field(default_factory=list)   # tar shards or Parquet tables to read


def check_segment(config: SegmentConfig) -> CheckedRun:
    """Check ``config`` and the files it names; raise ``ConfigError`` on the first mistake."""
    start = time.perf_counter()
    validate(config)
    check_installed(config.arch)   # ConfigError naming the architectures there are, or the extra
    check_decode(config.arch, config.decode)
    categories = load_categories(config.categories) if config.categories else None
    weights = weights_source(config.weights, config.arch, config.seed)
    run_folder.check_target(config.output_path, "OUTPUT", inputs=(config.input_path,))
    run_folder.check_output(config.output_path, config.resume, config.overwrite)
    check_lease(config.output_path)   # another live run writing OUTPUT: say so before any work
    found = formats.list_inputs(config.input_path, config.input_format, config.image_column,
                                config.name_column, exclude=(config.output_path,))
    return CheckedRun(found.input_format, found.listing, weights, categories,
                      round(time.perf_counter() - start, 3), found.skipped, found.root,
                      found.tables)

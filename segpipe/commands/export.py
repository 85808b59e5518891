"""``segpipe export``: check the request against the stored predictions, then write COCO files
into ``--to`` (``coco.writer``) and ``export.json``."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

from segpipe import __version__, schema
from segpipe.coco.selection import ExportOptions
from segpipe.coco.shards import COCO_NAME, read_index
from segpipe.coco.writer import export_coco
from segpipe.config import DEFAULT_COCO_SHARD_IMAGES, ConfigError
from segpipe.io import ownership
from segpipe.io.run_folder import (
    COCO_FILES,
    LOGS_DIR,
    check_folder_target,
    existing_predictions,
    read_run_settings,
)

EXPORT_JSON = "export.json"


@dataclass(frozen=True)
class CheckedExport:
    """What ``check_export`` found: the run's predictions, their settings, the options."""

    predictions_dir: str
    settings: schema.RunSettings
    options: ExportOptions


def check_export(output: str, options: ExportOptions,
                 class_names: Optional[str] = None) -> CheckedExport:
    """Raise ``ConfigError`` for requests the stored predictions cannot answer; ``class_names``
    (comma-separated names or ids of the run's categories) sets ``options.classes``."""
    predictions_dir = existing_predictions(output)
    settings = read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    if class_names:
        options = replace(options, classes=settings.categories.parse_classes(class_names))
    if options.score_threshold < settings.model.score_floor:
        raise ConfigError(f"score threshold {options.score_threshold} is below the stored score "
                          f"floor {settings.model.score_floor}: detections under the floor were never "
                          "kept; rerun segment with a lower --score-floor")
    if not settings.model.has_masks and (options.polygons or options.mask_threshold is not None):
        flag = "--polygons" if options.polygons else "--mask-threshold"
        raise ConfigError(f"{flag} needs masks, but this run's detector ({settings.model.arch}) "
                          "finds boxes only")
    if options.repastes_masks(settings) and not settings.soft_masks:
        raise ConfigError(f"mask threshold {options.mask_threshold} differs from the run's "
                          f"{settings.mask_threshold}, but the run kept no soft masks "
                          "(--no-soft-masks); rerun segment with soft masks to re-threshold")
    if options.instances_bbox not in ("mask", "model"):
        raise ConfigError(f"instances bbox must be mask or model, got {options.instances_bbox!r}")
    if not 0.0 <= options.score_threshold < 1.0 or (
            options.mask_threshold is not None and not 0.0 <= options.mask_threshold < 1.0):
        raise ConfigError("thresholds must be in [0, 1)")
    return CheckedExport(predictions_dir, settings, options)


def run_export(output: str, to: str, options: ExportOptions, show_progress: bool = False,
               class_names: Optional[str] = None, address: Optional[str] = None,
               checked: Optional[CheckedExport] = None,
               shard_images: int = DEFAULT_COCO_SHARD_IMAGES) -> dict:
    """``segpipe export``: write the COCO files (``instances.json`` and ``results.json``, or
    their shards of ``shard_images`` images; 0: single files, which merges a sharded run) with
    ``index.json`` and ``export.json`` into ``to`` from ``output/predictions`` alone, after
    ``check_export`` (``checked``, when the caller ran it). With a Ray ``address`` the shards
    are written in Ray tasks on that cluster (``export_coco(parallel=True)``)."""
    if checked is None:
        checked = check_export(output, options, class_names)
        check_export_target(to)
    predictions_dir, settings, options = checked.predictions_dir, checked.settings, checked.options
    ownership.mark_folder(to, "export")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if address:
            from segpipe.cluster.session import ray_session

            stack.enter_context(ray_session(address))
        counts = export_coco(predictions_dir, to, options, settings,
                             show_progress=show_progress, parallel=bool(address),
                             shard_images=shard_images)
    seconds = time.perf_counter() - start
    summary = {
        "segpipe": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": output,
        "asked": {**asdict(options), "classes": sorted(options.classes) if options.classes else None,
                  "mask_threshold": options.mask_threshold if options.mask_threshold is not None
                  else settings.mask_threshold},
        "run_settings": settings.to_json(),
        "counts": asdict(counts),
        "coco_shard_images": shard_images,
        "shards": len((read_index(to) or {"shards": []})["shards"]),
        "seconds": round(seconds, 3),
        "detections_per_s": round(counts.detections / seconds, 1) if seconds else None,
        "ray": address or None,
    }
    ownership.write_json(to, EXPORT_JSON, summary)
    return summary


def check_export_target(to: str) -> None:
    """Refuse a ``--to`` folder export cannot write (a file, no permission), a link on the
    way, or files there that export would replace and segpipe did not write."""
    check_folder_target(to, "--to", " (export writes instances.json, results.json (or their "
                                    "shards), index.json and export.json into it)")
    ownership.refuse_links(to, [LOGS_DIR], "export writes its log there")
    ownership.check_replaceable(to, (*COCO_FILES, EXPORT_JSON), matching=COCO_NAME)

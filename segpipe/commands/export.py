"""``segpipe export``: check the request against the stored predictions, then write the files
of the asked format (``annotations.formats``: COCO, Label Studio tasks, an Ultralytics YOLO
dataset) into ``--to``, and ``export.json``."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

from segpipe.annotations.formats import ExportFormat, writer
from segpipe.annotations.selection import ExportOptions
from segpipe.config import DEFAULT_COCO_SHARD_IMAGES, ConfigError
from segpipe.io import lease, ownership
from segpipe.model.settings import RunSettings
from segpipe.output.run_folder import (
    LOGS_DIR,
    check_folder_target,
    check_target,
    existing_predictions,
    read_run_settings,
    run_input,
)
from segpipe.version import __version__

EXPORT_JSON = "export.json"
@dataclass(frozen=True)
class CheckedExport:
    """What ``check_export`` found: the run's predictions, their settings, the options."""

    predictions_dir: str
    settings: RunSettings
    options: ExportOptions


def check_export(output: str, options: ExportOptions,
                 class_names: Optional[str] = None) -> CheckedExport:
    """Raise ``ConfigError`` for requests the stored predictions cannot answer; ``class_names``
    (comma-separated names or ids of the run's categories) sets ``options.classes``."""
    predictions_dir = existing_predictions(output)
    settings = read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    if class_names is not None:   # "" (an unset shell variable) is refused, not "every class"
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
    if options.max_per_image is not None and options.max_per_image < 1:
        raise ConfigError(f"--max-per-image must be at least 1 (leave it out for no limit), "
                          f"got {options.max_per_image}")
    if options.min_area < 0:
        raise ConfigError(f"--min-area must be >= 0 pixels, got {options.min_area}")
    if not 0.0 <= options.score_threshold < 1.0 or (
            options.mask_threshold is not None and not 0.0 <= options.mask_threshold < 1.0):
        raise ConfigError("thresholds must be in [0, 1)")
    return CheckedExport(predictions_dir, settings, options)


def run_export(output: str, to: str, options: ExportOptions, show_progress: bool = False,
               class_names: Optional[str] = None, address: Optional[str] = None,
               checked: Optional[CheckedExport] = None,
               shard_images: int = DEFAULT_COCO_SHARD_IMAGES,
               export_format: Optional[ExportFormat] = None) -> dict:
    """``segpipe export``: write the files of ``export_format`` (default COCO) and
    ``export.json`` into ``to`` from ``output/predictions`` alone, after ``check_export``
    (``checked``, when the caller ran it) and ``check_export_target``.

    COCO: ``instances.json`` and ``results.json``, or their shards of ``shard_images`` images
    (0: single files, which merges a sharded run), with ``index.json``; with a Ray
    ``address`` the parts (COCO shards, Label Studio task files, YOLO parts of
    ``labels.yolo.PART_IMAGES`` images) are written in Ray tasks on that cluster."""
    export_format = replace(export_format or ExportFormat(), shard_images=shard_images)
    if checked is None:
        export_format.check()
        checked = check_export(output, options, class_names)
        check_export_target(to, export_format.name, output, export_format.image_root)
    predictions_dir, settings, options = checked.predictions_dir, checked.settings, checked.options
    ownership.mark_folder(to, "export")
    fmt = writer(export_format.name)
    with lease.holding(to, "--to"):   # one writer at a time, as for segment
        # export.json, written last, says an export finished: a killed one leaves none
        ownership.remove_recorded(to, [EXPORT_JSON])
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if address:
                from segpipe.cluster.session import ray_session

                stack.enter_context(ray_session(address))
            counts, written = fmt.write(predictions_dir, to, options, settings, export_format,
                                        parallel=bool(address), show_progress=show_progress)
        seconds = time.perf_counter() - start
        summary = {
            "segpipe": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": output,
            "format": export_format.name,
            "asked": {**asdict(options), "classes": sorted(options.classes) if options.classes else None,
                      "mask_threshold": options.mask_threshold if options.mask_threshold is not None
                      else settings.mask_threshold, **asdict(export_format)},
            "run_settings": settings.to_json(),
            "counts": asdict(counts),
            **written,
            "seconds": round(seconds, 3),
            "detections_per_s": round(counts.detections / seconds, 1) if seconds else None,
            "ray": address or None,
        }
        ownership.write_json(to, EXPORT_JSON, summary)
    return summary


def check_export_target(to: str, format_name: str = "coco", output: Optional[str] = None,
                        image_root: Optional[str] = None) -> None:
    """Refuse a ``--to`` folder export cannot write (a file, no permission), a link on the
    way, files there that export would replace and segpipe did not write (the format's own
    ``check_target``), a folder another command is writing, or (given the run's ``output``
    and ``image_root``) one of the run's own folders or its images' (``run_folder.check_target``)."""
    if output is not None:   # a YOLO --image-root is the folder of the images
        check_target(to, "--to", output, (run_input(output), image_root if format_name == "yolo" else None))
    fmt = writer(format_name)
    check_folder_target(to, "--to", f" (export writes {fmt.WRITES} and export.json into it)")
    ownership.refuse_links(to, [LOGS_DIR], "export writes its log there")
    lease.check_free(to, what="--to")
    ownership.check_replaceable(to, [EXPORT_JSON])
    fmt.check_target(to)

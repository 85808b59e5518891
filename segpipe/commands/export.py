"""``segpipe export``: check the request against the stored predictions, then write the files
of the asked format into ``--to`` and ``export.json``: COCO (``coco.writer``), Label Studio
tasks (``labels.label_studio``) or an Ultralytics YOLO dataset (``labels.yolo``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import pyarrow.fs as pafs

from segpipe import __version__, schema
from segpipe.coco.selection import ExportOptions
from segpipe.coco.shards import COCO_NAME, read_index
from segpipe.coco.writer import export_coco
from segpipe.config import DEFAULT_COCO_SHARD_IMAGES, ConfigError
from segpipe.io import lease, ownership, storage
from segpipe.io.run_folder import (
    COCO_FILES,
    LOGS_DIR,
    check_folder_target,
    check_target,
    existing_predictions,
    read_run_settings,
    run_input,
)

EXPORT_JSON = "export.json"
FORMATS = ("coco", "label-studio", "yolo")


@dataclass(frozen=True)
class ExportFormat:
    """What ``--format`` asks beyond the detections: where the images are for tools that show
    them (Label Studio's URLs, YOLO's links), and YOLO's train/val split."""

    name: str = "coco"
    image_root: Optional[str] = None
    val_fraction: float = 0.1
    split_seed: int = 0

    def check(self) -> None:
        """``ConfigError`` for a format request that cannot be written."""
        if self.name not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.name!r}")
        if self.name == "label-studio" and not self.image_root:
            raise ConfigError("--format label-studio needs --image-root: where Label Studio finds "
                              "the images, e.g. /data/local-files/?d=photos/ or s3://bucket/photos/")
        if self.name == "yolo":
            if not 0.0 <= self.val_fraction <= 1.0:
                raise ConfigError(f"--val-fraction must be in [0, 1], got {self.val_fraction}")
            if self.image_root and not os.path.isdir(self.image_root):
                raise ConfigError(f"--image-root {self.image_root} is not a local folder: a YOLO "
                                  "dataset links its images from the folder the run read")


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
               shard_images: int = DEFAULT_COCO_SHARD_IMAGES,
               export_format: Optional[ExportFormat] = None) -> dict:
    """``segpipe export``: write the files of ``export_format`` (default COCO) and
    ``export.json`` into ``to`` from ``output/predictions`` alone, after ``check_export``
    (``checked``, when the caller ran it) and ``check_export_target``.

    COCO: ``instances.json`` and ``results.json``, or their shards of ``shard_images`` images
    (0: single files, which merges a sharded run), with ``index.json``; with a Ray
    ``address`` the parts (COCO shards, Label Studio task files, YOLO parts of
    ``labels.yolo.PART_IMAGES`` images) are written in Ray tasks on that cluster."""
    export_format = export_format or ExportFormat()
    if checked is None:
        export_format.check()
        checked = check_export(output, options, class_names)
        check_export_target(to, export_format.name, output, export_format.image_root)
    predictions_dir, settings, options = checked.predictions_dir, checked.settings, checked.options
    ownership.mark_folder(to, "export")
    with lease.holding(to, "--to"):   # one writer at a time, as for segment
        start = time.perf_counter()
        written: dict = {}
        with contextlib.ExitStack() as stack:
            if address:
                from segpipe.cluster.session import ray_session

                stack.enter_context(ray_session(address))
            if export_format.name == "label-studio":
                from segpipe.labels.label_studio import export_label_studio

                counts, names = export_label_studio(predictions_dir, to, options, settings,
                                                    export_format.image_root or "", parallel=bool(address))
                written = {"task_files": names, "label_config": "label_config.xml"}
            elif export_format.name == "yolo":
                from segpipe.labels.yolo import YoloSplit, export_yolo

                counts, yolo = export_yolo(predictions_dir, to, options, settings,
                                           YoloSplit(export_format.val_fraction, export_format.split_seed),
                                           export_format.image_root, parallel=bool(address))
                written = {"data_yaml": "data.yaml", **asdict(yolo)}
            else:
                counts = export_coco(predictions_dir, to, options, settings,
                                     show_progress=show_progress, parallel=bool(address),
                                     shard_images=shard_images)
                written = {"coco_shard_images": shard_images,
                           "shards": len((read_index(to) or {"shards": []})["shards"])}
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
    way, files there that export would replace and segpipe did not write, or (given the
    run's ``output`` and ``image_root``) one of the run's own folders or its images'
    (``run_folder.check_target``)."""
    if output is not None:   # a YOLO --image-root is the folder of the images
        check_target(to, "--to", output, (run_input(output), image_root if format_name == "yolo" else None))
    from segpipe.labels.label_studio import TASK_FILE_NAME
    from segpipe.labels.yolo import YOLO_DIRS, YOLO_FILES

    writes = {"coco": "instances.json, results.json (or their shards), index.json",
              "label-studio": "tasks.json (or its parts) and label_config.xml",
              "yolo": "data.yaml, train.txt, val.txt, labels/ and images/"}[format_name]
    check_folder_target(to, "--to", f" (export writes {writes} and export.json into it)")
    ownership.refuse_links(to, [LOGS_DIR], "export writes its log there")
    lease.check_free(to, what="--to")
    if format_name == "coco":
        ownership.check_replaceable(to, (*COCO_FILES, EXPORT_JSON), matching=COCO_NAME)
    elif format_name == "label-studio":
        ownership.check_replaceable(to, ("label_config.xml", EXPORT_JSON),
                                    matching=re.compile(TASK_FILE_NAME))
    else:
        fs, root = storage.resolve(to)
        if not isinstance(fs, pafs.LocalFileSystem):
            raise ConfigError(f"--format yolo writes a local folder (Ultralytics reads one), not {to}")
        ownership.refuse_links(to, YOLO_DIRS, "export writes YOLO labels there")
        ownership.check_replaceable(to, (*YOLO_FILES, EXPORT_JSON))
        ownership.read_stamps(to)   # its record of the label files it wrote, if any, is its own
        ours = "data.yaml" in (ownership.recorded(to) or {})
        there = [storage.join(root, d) for d in YOLO_DIRS if storage.exists(fs, storage.join(root, d))]
        if there and not ours:
            raise ownership.refusal(there, to, "write into")

"""The ``segpipe`` command line: parse arguments, check them, and call the library.

Mistakes are found before torch is imported or Ray started (``preflight``, ``render``'s and
``export``'s own checks): exit 2 with one line saying what to fix. While Ray runs, everything
it prints goes to a log file in OUTPUT (``console``); the terminal shows segpipe's lines only.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
from typing import Optional, Sequence

from segpipe import console
from segpipe.annotations.formats import FORMATS
from segpipe.config import (
    DEFAULT_COCO_SHARD_IMAGES,
    ConfigError,
    SegmentConfig,
    config_fields,
    load_config,
    one_line,
)
from segpipe.io.storage import redact
from segpipe.model.families import ARCHITECTURES, family_of
from segpipe.output.run_folder import prediction_files, predictions_dir

DESCRIPTION = """\
Segment large image datasets with torchvision's Mask R-CNN (or box-only Faster R-CNN) on a
Ray cluster or a laptop, and write COCO instance annotations to train on, evaluate, or load
into a labelling tool.

`segpipe segment` is the one expensive pass: it writes every image's detections (with soft
masks) to OUTPUT/predictions/*.parquet and the COCO files to OUTPUT/coco/. `export` (COCO,
Label Studio, YOLO), `review`, `eval` and `render` then work from OUTPUT/predictions alone,
without a GPU or the images' model.
"""

EPILOG = """\
Run `segpipe COMMAND --help` for the options of a command.
Exit status: 0 done; 1 the run could not account for every image, or nothing could be drawn;
2 a mistake in what was asked (nothing was done); 130 interrupted (Ctrl-C or SIGTERM).
"""

#: Sections of ``segment --help``: config fields by what they are about.
SEGMENT_GROUPS: dict[str, tuple[str, ...]] = {
    "model and weights": ("arch", "weights", "categories", "seed", "min_size", "max_size", "image_size",
                          "nms_threshold", "detections_per_image", "proposals_per_image",
                          "precision", "batch_canvas"),
    "what is kept": ("score_floor", "score_threshold", "mask_threshold", "soft_masks",
                     "soft_mask_dtype"),
    "inputs": ("input_format", "image_column", "name_column", "max_image_pixels",
               "max_image_bytes", "decode"),
    "huge images (docs/huge-images.md)": ("tile", "tile_overlap", "tile_full_pass",
                                              "tile_merge_threshold", "tile_join_seams"),
    "cluster and sizing": ("address", "num_gpus", "actors", "cpus_per_actor", "torch_threads",
                           "batch_size", "predictor_threads", "rows_per_file"),
    "coco/ output": ("coco_shard_images",),
    "run": ("overwrite", "resume", "progress", "fault_kill_after_batches"),
}

_TYPES = {"int": int, "float": float, "str": str}


class SegpipeParser(argparse.ArgumentParser):
    """argparse with "did you mean" for misspelled commands, flags and choices."""

    def error(self, message: str) -> None:  # type: ignore[override]
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2)) or \
                [c.strip() for c in found.group(2).split(",")]
            close = difflib.get_close_matches(found.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)

    def unknown_flags(self, extra: list[str]) -> None:
        """Exit 2 naming each unknown argument, with the closest flag where there is one."""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        lines = [f"unrecognized arguments: {' '.join(extra)}"]
        for arg in extra:
            flag = arg.split("=", 1)[0]
            if flag.startswith("-"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    lines.append(f"  {flag}: did you mean {close[0]}?")
        self.error("\n".join(lines))


def _help(f) -> str:
    text = f.metadata["help"]
    if f.name == "arch":
        text += f"; one of {', '.join(ARCHITECTURES)}"
    if f.default is not None and not f.metadata.get("positional"):
        default = f.default if not isinstance(f.default, bool) else \
            ("on" if f.default else "off")
        text += f" (default: {default})"
    return text.replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    fields = {f.name: f for f in config_fields()}
    inputs = parser.add_argument_group("INPUT and OUTPUT (or `input:` / `output:` in --config)")
    for name in ("input", "output"):
        inputs.add_argument(name, metavar=name.upper(), nargs="?", default=None,
                            help=_help(fields[name]))
    inputs.add_argument("--config", metavar="FILE",
                        help="YAML file of these options (keys as in conf/default.yaml, "
                             "score_floor for --score-floor); flags override its keys")
    grouped = {n for names in SEGMENT_GROUPS.values() for n in names}
    missing = set(fields) - grouped - {"input", "output"}
    assert not missing, f"config fields without a --help section: {missing}"
    for title, names in SEGMENT_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            flag = "--" + f.name.replace("_", "-")
            kind = f.type.replace("Optional[", "").rstrip("]")
            if kind == "bool":
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=_help(f))
            else:
                metavar = f.metadata.get("metavar") or \
                    {"int": "N", "float": "X"}.get(kind, f.name.upper())
                group.add_argument(flag, dest=f.name, type=_TYPES[kind], default=None,
                                   choices=f.metadata.get("choices"), metavar=metavar,
                                   help=_help(f))


def build_parser() -> SegpipeParser:
    parser = SegpipeParser(prog="segpipe", description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment = commands.add_parser(
        "segment", help="segment the images under INPUT into OUTPUT (the expensive pass)",
        description="Segment every image under INPUT (a folder, tar shards or Parquet tables, "
                    "local or s3://) and write OUTPUT/predictions/*.parquet, "
                    "OUTPUT/coco/instances.json and results.json (in shards listed by coco/index.json "
                    "for runs of more than --coco-shard-images images) and OUTPUT/run.json. "
                    "Every option is also a key of a --config YAML file.",
        usage="segpipe segment INPUT OUTPUT [--config FILE] [options]")
    _add_config_flags(segment)

    export = commands.add_parser(
        "export", help="write COCO, Label Studio or YOLO files from OUTPUT/predictions (no model)",
        description="Write a run's predictions/ at other thresholds, classes or limits, without "
                    "the model or the images, as COCO (DIR/instances.json, DIR/results.json or "
                    "their shards, DIR/index.json), Label Studio tasks with pre-annotations "
                    "(DIR/tasks.json, DIR/label_config.xml) or an Ultralytics YOLO segmentation "
                    "dataset (DIR/data.yaml, train.txt, val.txt, labels/, images/), and "
                    "DIR/export.json.")
    export.add_argument("output", metavar="OUTPUT", help="the OUTPUT folder of a segment run")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="folder to write the files (and export.json) to")
    export.add_argument("--format", choices=tuple(FORMATS), default="coco",
                        help="coco: COCO instances and results files; label-studio: tasks with "
                             "pre-annotations (brush masks, exact; --polygons: polygon regions) "
                             "and the labelling config; yolo: an Ultralytics segmentation "
                             "dataset (default: coco)")
    export.add_argument("--image-root", metavar="ROOT",
                        help="label-studio: the URL prefix of the images (each task's image is "
                             "ROOT + file_name), e.g. /data/local-files/?d=photos/ or "
                             "s3://bucket/photos/; yolo: the local folder the run read, linked "
                             "from DIR/images/ (default: no links)")
    export.add_argument("--val-fraction", type=float, default=0.1, metavar="X",
                        help="yolo: share of images in val.txt, chosen by a seeded hash of the "
                             "file name (default: 0.1)")
    export.add_argument("--split-seed", type=int, default=0, metavar="N",
                        help="yolo: seed of the train/val hash (default: 0)")
    export.add_argument("--score-threshold", type=float, default=0.5, metavar="X",
                        help="lowest score written; not below the run's score floor "
                             "(default: 0.5)")
    export.add_argument("--mask-threshold", type=float, default=None, metavar="X",
                        help="re-binarise the stored soft masks at X (default: the run's own "
                             "masks, as stored)")
    export.add_argument("--classes", metavar="NAMES_OR_IDS",
                        help="comma-separated class names (any case) or category ids to keep, "
                             "e.g. person,car (default: all)")
    export.add_argument("--max-per-image", type=int, metavar="N",
                        help="keep only the N highest-scoring annotations of each image "
                             "(default: all)")
    export.add_argument("--min-area", type=int, default=1, metavar="PIXELS",
                        help="leave out masks (or boxes) with a smaller area (default: 1, which "
                             "leaves out empty masks only)")
    export.add_argument("--polygons", action="store_true",
                        help="write polygon segmentations (for labelling tools) instead of RLE "
                             "(default: RLE)")
    export.add_argument("--instances-bbox", choices=("mask", "model"), default="mask",
                        help="bbox of instances.json annotations: the tight box of the written "
                             "mask, as COCO ground truth has it and importers expect, or the "
                             "model's predicted box (results.json always has the model's) "
                             "(default: mask)")
    export.add_argument("--coco-shard-images", type=int, default=DEFAULT_COCO_SHARD_IMAGES,
                        metavar="N",
                        help="images per COCO shard: a run of more images is written as "
                             "instances-00000-of-000NN.json... with index.json; 0: single "
                             "files however large, which merges a sharded run (default: "
                             f"{DEFAULT_COCO_SHARD_IMAGES:,})")
    export.add_argument("--address", default=None,
                        help="Ray cluster to export on, one task per COCO shard, Label Studio task "
                             "file or 10,000 YOLO images (default: RAY_ADDRESS; without either, "
                             "this process exports, which is faster than starting a local Ray "
                             "for all but huge runs)")
    export.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")

    review = commands.add_parser(
        "review", help="rank OUTPUT's images by how much a person's look would change their labels",
        description="Score every image of a run from its predictions/ (detections near the score "
                    "threshold, uncertain soft masks, masks that change between mask thresholds, "
                    "rare classes; docs/labelling.md), write DIR/review.jsonl and DIR/review.csv "
                    "in priority order with the reasons, and DIR/review.json; optionally the top "
                    "images as a COCO or Label Studio subset (DIR/top/) and a gallery "
                    "(DIR/gallery/).")
    review.add_argument("output", metavar="OUTPUT", help="the OUTPUT folder of a segment run")
    review.add_argument("--to", required=True, metavar="DIR", help="folder to write the ranking to")
    review.add_argument("--score-threshold", type=float, default=0.5, metavar="X",
                        help="the threshold labels will be exported at (default: 0.5)")
    review.add_argument("--margin", type=float, default=0.15, metavar="X",
                        help="scores within X of the threshold are borderline (default: 0.15)")
    review.add_argument("--top", type=int, metavar="K",
                        help="the first K images of the queue for --subset and the gallery "
                             "(default: gallery of 100, no subset)")
    review.add_argument("--subset", choices=("coco", "label-studio"),
                        help="write the top K images as this format into DIR/top/ (default: "
                             "no subset)")
    review.add_argument("--image-root", metavar="ROOT",
                        help="--subset label-studio: the URL prefix of the images, as export's "
                             "(default: none)")
    review.add_argument("--images", metavar="INPUT",
                        help="the INPUT the run segmented: draw the top images, in queue order, "
                             "into DIR/gallery/ (Ray tasks) (default: no gallery)")
    review.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")

    evaluate = commands.add_parser(
        "eval", help="COCO AP of OUTPUT's predictions against ground-truth annotations",
        description="Evaluate a run's predictions with pycocotools' COCOeval against a COCO "
                    "instances file. Images are matched by file_name; categories by id, or "
                    "by name when the ground truth numbers them differently. Writes "
                    "OUTPUT/eval.json.")
    evaluate.add_argument("output", metavar="OUTPUT", help="the OUTPUT folder of a segment run")
    evaluate.add_argument("--gt", required=True, metavar="ANNOTATIONS.json",
                          help="COCO instances file (images, annotations, categories), or a "
                               "segpipe index.json of COCO shards (or its folder)")
    evaluate.add_argument("--score-threshold", type=float, default=None, metavar="X",
                          help="lowest score evaluated (default: the run's score floor, as "
                               "COCO evaluation expects all detections)")
    evaluate.add_argument("--iou-type", choices=("segm", "bbox", "both"), default=None,
                          help="which AP to compute: mask (segm), box (bbox) or both "
                               "(default: both; bbox only for box-only detectors)")
    evaluate.add_argument("--crowd-as-objects", action="store_true",
                          help="evaluate ground truth marked iscrowd=1 as ordinary objects "
                               "(default: off, crowd regions are ignored as COCO defines)")

    render = commands.add_parser(
        "render", help="draw OUTPUT's detections on the images and write a gallery",
        description="Draw each detection's mask, box and label on the original images (in "
                    "Ray tasks) and write DIR/images/ and DIR/index.html.")
    render.add_argument("output", metavar="OUTPUT", help="the OUTPUT folder of a segment run")
    render.add_argument("--images", required=True, metavar="INPUT",
                        help="the INPUT folder the run segmented (image files)")
    render.add_argument("--to", required=True, metavar="DIR",
                        help="folder to write images/ and index.html to")
    render.add_argument("--limit", type=int, default=100, metavar="N",
                        help="draw the first N images by name (default: 100)")
    render.add_argument("--score-threshold", type=float, default=0.5, metavar="X",
                        help="lowest score drawn (default: 0.5)")
    render.add_argument("--classes", metavar="NAMES_OR_IDS",
                        help="comma-separated class names or ids to draw (default: all)")
    render.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    render.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")

    weights = commands.add_parser(
        "weights", help="where pretrained weights are cached, and download them",
        description="Print where torch's cache keeps the pretrained COCO weights of an "
                    "architecture and the URL they come from; exit 0 when the file is there, "
                    "1 when it is missing. --download fetches it (for container images and "
                    "machines that prepare offline nodes).")
    pretrained = family_of(ARCHITECTURES[0]).arches   # torchvision's, with COCO weights
    weights.add_argument("--arch", choices=pretrained, default=pretrained[0],
                         help=f"architecture (default: {pretrained[0]})")
    weights.add_argument("--download", action="store_true",
                         help="download the file into the cache if it is missing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    commands = {"segment": _segment, "export": _export, "review": _review, "eval": _eval,
                "render": _render, "weights": _weights}
    with console.redacted_output():   # argparse's own messages repeat what was typed
        args, extra = parser.parse_known_args(argv)
        if extra:
            subparser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore
            subparser.unknown_flags(extra)
        try:
            with console.segpipe_lines():
                return commands[args.command](args)
        except KeyboardInterrupt:   # Ctrl-C before a command's own handling (torch, Ray starting)
            print("\nsegpipe: interrupted", file=sys.stderr)
            return 130
        except OSError as exc:   # storage failing once the work began (a full disk...)
            print(f"segpipe {args.command}: failed: {one_line(exc)}",
                  file=sys.stderr)
            return 1


def _config_error(exc: Exception) -> int:
    """A mistake found before any work (or a place that cannot be read or written then):
    one line, exit 2."""
    if isinstance(exc, ConfigError):
        print(f"segpipe: configuration error: {exc}", file=sys.stderr)
    else:   # an unreachable bucket, a folder without permission: nothing was done
        print(f"segpipe: cannot reach what was asked (nothing was done): "
              f"{one_line(exc)}", file=sys.stderr)
    return 2


def segment_config(args: argparse.Namespace) -> SegmentConfig:
    """The validated configuration of a parsed ``segment`` command line (``--config`` file,
    then the flags); ``ConfigError`` names what to fix."""
    return load_config(args.config, **{f.name: getattr(args, f.name) for f in config_fields()})


def _segment(args: argparse.Namespace) -> int:
    from segpipe.commands.preflight import check_segment

    try:
        config = segment_config(args)
        checked = check_segment(config)
    except (ConfigError, OSError) as exc:
        return _config_error(exc)

    with console.interrupt_flag() as interrupted:   # Ctrl-C a library catches still stops the run
        try:
            from segpipe.commands.segment import execute_run, prepare_run

            prepared = prepare_run(config, checked)   # torch, weights: still nothing written
            if interrupted.is_set():
                raise KeyboardInterrupt
        except ConfigError as exc:
            return _config_error(exc)
        except KeyboardInterrupt:
            print("\nsegpipe: interrupted before any work; nothing was written", file=sys.stderr)
            return 130
        prepared.interrupted = interrupted
        log = console.RunLog(config.output_path, "segment")
        try:
            with console.output_to_log(log.path):
                run_report = execute_run(prepared)
        except ConfigError as exc:
            return _config_error(exc)
        except KeyboardInterrupt:
            return _interrupted(config, log)
        except Exception as exc:   # a full disk, a lost cluster: one line, the way on, exit 1
            return _failed(config, log, exc)
        finally:
            log.publish()
    for line in run_report.summary_lines() + console.translate(log.text()):
        print(line)
    print(f"segpipe: wrote {predictions_dir(config.output_path)}, "
          f"{_coco_written(config.output_path)}, "
          f"run.json; Ray's own messages are in {log.where}")
    return 0 if run_report.accounting.complete else 1


def _coco_written(output: str) -> str:
    """What coco/ holds, in words: its two files, or how many shards."""
    from segpipe.coco.shards import read_index
    from segpipe.output.run_folder import coco_dir

    shards = (read_index(coco_dir(output)) or {"shards": [None]})["shards"]
    if len(shards) == 1:
        return "coco/instances.json, coco/results.json"
    return f"coco/ in {len(shards)} shards (coco/index.json lists them)"


def _resume_hint(config) -> str:
    """How many complete prediction files are kept, and the command that finishes the run."""
    kept: int | str
    try:
        kept = len(prediction_files(predictions_dir(config.output_path)))
    except Exception:   # OUTPUT unreachable now: the command is still the way on
        kept = "the"
    command = " ".join(a if re.fullmatch(r"[\w@%+=:,./-]+", a) else repr(a) for a in sys.argv)
    resume = command if "--resume" in sys.argv else f"{command} --resume"
    resume = re.sub(r"\s--overwrite\b", "", resume)
    if redact(resume) != resume:
        resume += ("\n  (credentials in the URIs are hidden here: give them again, or through "
                   "the environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    return (f"{kept} complete prediction file(s) are kept in "
            f"{predictions_dir(config.output)}. Finish the run with:\n  {resume}")


def _interrupted(config, log) -> int:
    print(f"\nsegpipe: interrupted; {_resume_hint(config)}\n(Ray's messages: {log.where})",
          file=sys.stderr)
    return 130


def _failed(config, log, exc: Exception) -> int:
    """A run that failed after it started: the cause in one line, the traceback in the log,
    and the command that finishes the run once the cause is mended."""
    import traceback

    with contextlib.suppress(OSError):
        with open(log.path, "a") as f:
            f.write("\nsegpipe: the run failed:\n" + traceback.format_exc())
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(cause) > 300:
        cause = cause[:300] + "..."
    print(f"segpipe: the run failed: {cause}\n(the traceback is in {log.where})\n"
          f"segpipe: {_resume_hint(config)}\n(once the cause is mended: free space, restart "
          "the cluster...)", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    from segpipe.annotations.formats import writer
    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import ExportFormat, check_export, check_export_target, run_export

    try:
        if args.coco_shard_images < 0:
            raise ConfigError("--coco-shard-images must be >= 0 (0: single files)")
        options = ExportOptions(score_threshold=args.score_threshold,
                                mask_threshold=args.mask_threshold,
                                max_per_image=args.max_per_image, min_area=args.min_area,
                                polygons=args.polygons, instances_bbox=args.instances_bbox)
        export_format = ExportFormat(args.format, args.image_root, args.val_fraction, args.split_seed)
        export_format.check()
        checked = check_export(args.output, options, args.classes)
        check_export_target(args.to, args.format, args.output, args.image_root)
    except (ConfigError, OSError) as exc:
        return _config_error(exc)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:   # Ray's own messages go to DIR/logs, as render's do
        log = console.RunLog(args.to, "export")
        try:
            with console.output_to_log(log.path):
                summary = run_export(args.output, args.to, options, args.progress,
                                     address=address, checked=checked,
                                     shard_images=args.coco_shard_images,
                                     export_format=export_format)
        finally:
            log.publish()
    else:
        summary = run_export(args.output, args.to, options, args.progress, checked=checked,
                             shard_images=args.coco_shard_images, export_format=export_format)
    from segpipe.annotations.selection import ExportCounts

    c = summary["counts"]
    counts = ExportCounts(**c)
    print(f"segpipe export: {c['annotations']} annotations on {c['ok']} images from "
          f"{c['detections']} stored detections in {summary['seconds']} s "
          f"({summary['detections_per_s']} detections/s) → {args.to}")
    _random_weights_warning(summary["run_settings"].get("random_weights", False))
    for n, reason in counts.left_out():
        print(f"segpipe export:   {n} left out: {reason}")
    _print_damaged("segpipe export", counts.damaged_images, counts.damaged)
    if counts.masks_with_holes:
        print(f"segpipe export:   {counts.masks_with_holes} masks have holes: their polygons "
              "reach each hole along a zero-width cut (keyhole polygons), which keeps the holes")
    for note in writer(args.format).notes(summary, args.to):
        print(f"segpipe export:   {note}")
    for name, n in sorted(c["per_category"].items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
        print(f"  {n:>8}  {name}")
    return 0


def _random_weights_warning(random_weights: bool) -> None:
    """Say that the run's detections come from random weights, where they do."""
    if random_weights:
        from segpipe.model.weights import RANDOM_WEIGHTS_NOTE

        print(f"segpipe: WARNING: {RANDOM_WEIGHTS_NOTE}")


def _print_damaged(prefix: str, images: int, named: list[str], detections: int = 0) -> None:
    """Say how many image rows and ``detections`` were damaged in predictions/ and left out,
    and name the first of them."""
    if detections:
        print(f"{prefix}:   {detections} detection(s) left out: damaged in predictions/")
    if images:
        print(f"{prefix}:   {images} image row(s) damaged in predictions/, left out as errors")
    if named:
        print(f"{prefix}:   damaged in predictions/ (edited or broken files; the first "
              f"{len(named)}):")
        for line in named:
            print(f"{prefix}:     {line}")


def _review(args: argparse.Namespace) -> int:
    from segpipe.commands.review import ReviewRequest, check_review, run_review

    request = ReviewRequest(args.output, args.to, args.score_threshold, args.margin, args.top,
                            args.subset, args.image_root, args.images)
    try:
        checked = check_review(request)
    except (ConfigError, OSError) as exc:
        return _config_error(exc)
    if args.images:   # Ray's own messages (the gallery) go to DIR/logs, as render's do
        log = console.RunLog(args.to, "review")
        try:
            with console.output_to_log(log.path):
                summary = run_review(request, show_progress=args.progress, checked=checked)
        finally:
            log.publish()
    else:
        summary = run_review(request, show_progress=args.progress, checked=checked)
    from segpipe.review.signals import SIGNAL_UNITS

    print(f"segpipe review: {summary['images']} images ranked in {summary['seconds']} s → "
          f"{args.to.rstrip('/')}/review.jsonl, review.csv")
    _random_weights_warning(summary["random_weights"])
    print("segpipe review:   signals per image (the sum over its detections of each one's 0..1):")
    for name, spread in summary["signals"].items():
        print(f"segpipe review:   {name} ({SIGNAL_UNITS[name]}): above 0.05 on "
              f"{spread['images_over_0.05']} of {summary['images']} images; per image mean "
              f"{spread['mean']}, max {spread['max']}")
    damaged = summary["damaged"]
    _print_damaged("segpipe review", damaged["images"], damaged["named"], damaged["detections"])
    for record in summary["first"][:5]:
        print(f"  #{record['rank']} {record['file_name']} ({record['priority']}): "
              + "; ".join(record["reasons"][:2]))
    if "subset" in summary:
        s = summary["subset"]
        print(f"segpipe review: top {s['images']} images as {s['format']} → {s['folder']}")
    if "gallery" in summary:
        print(f"segpipe review: gallery of {summary['gallery']['rendered']} images: "
              f"open {summary['gallery']['index']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from segpipe.coco.evaluate import IOU_TYPES
    from segpipe.commands.evaluate import run_eval

    iou_types = None if args.iou_type is None else \
        IOU_TYPES if args.iou_type == "both" else (args.iou_type,)
    try:
        report = run_eval(args.output, args.gt, args.score_threshold, iou_types,
                          args.crowd_as_objects)
    except (ConfigError, OSError) as exc:   # eval.json is written last: nothing was done
        return _config_error(exc)
    matching = report["matching"]
    _random_weights_warning(report["random_weights"])
    for key in ("category_message", "crowd_message", "own_export_message"):
        if matching[key]:
            print(f"segpipe eval: NOTE: {matching[key]}")
    for iou_type in report["iou_types"]:
        print(f"segpipe eval: {iou_type}")
        print(report["tables"][iou_type], end="")
    print(f"segpipe eval: {matching['images_evaluated']} of {matching['ground_truth_images']} "
          f"ground-truth images evaluated, {report['detections']} detections "
          f"(score >= {report['score_threshold']})")
    _print_damaged("segpipe eval", 0, matching["damaged"], matching["damaged_detections"])
    for key in ("not_predicted", "failed", "size_mismatch"):
        if matching[key]:
            print(f"segpipe eval: {len(matching[key])} ground-truth image(s) {key.replace('_', ' ')}:")
            for name in matching[key][:20]:
                print(f"  {name}")
    print(f"segpipe eval: wrote {args.output.rstrip('/')}/eval.json")
    return 0


def _render(args: argparse.Namespace) -> int:
    from segpipe.commands.render import RenderRequest, check_render

    request = RenderRequest(args.output, args.images, args.to, args.limit,
                            args.score_threshold, args.classes, args.address)
    try:
        checked = check_render(request)
    except (ConfigError, OSError) as exc:
        return _config_error(exc)

    from segpipe.commands.render import run_render

    log = console.RunLog(args.to, "render")
    try:
        with console.output_to_log(log.path):
            summary = run_render(request, checked, show_progress=args.progress)
    finally:
        log.publish()
    print(f"segpipe render: {summary['rendered']} images drawn, {len(summary['errors'])} failed; "
          f"open {summary['index']}")
    _random_weights_warning(summary["random_weights"])
    for name, error in summary["errors"].items():
        print(f"  {name}: {error}")
    if summary["damaged"]:
        print(f"segpipe render: {len(summary['damaged'])} image(s) or detection(s) left out: "
              "damaged in predictions/")
        _print_damaged("segpipe render", 0, summary["damaged"][:5])
    if summary["rendered"] == 0:
        print("segpipe render: no image could be drawn (are --images the INPUT the run "
              "segmented?)", file=sys.stderr)
        return 1
    return 0


def _weights(args: argparse.Namespace) -> int:
    """Print the cache path and URL of the pretrained file; exit 0 if it is there, 1 if not."""
    from segpipe.model.weights import (
        PRETRAINED,
        WeightsError,
        describe_cache_folder,
        fetch,
        weights_source,
    )

    source = weights_source("pretrained", args.arch)
    if args.download and source.missing:
        try:
            fetch(source)
        except WeightsError as exc:
            print(f"segpipe: {exc}", file=sys.stderr)
    present = not source.missing
    print(f"{args.arch}: {'present' if present else 'missing'}: {source.path}")
    print(f"  weights: {PRETRAINED[args.arch][0]} from {source.url}")
    print(f"  folder:  {describe_cache_folder()}")
    return 0 if present else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``segpipe`` command line: parse arguments and call the library.

Exit status: 0 when the run completed (images that failed are rows with ``status="error"``,
counted in the summary), 2 for a configuration mistake (found before any work), 1 when the
run could not account for every input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from segpipe.config import ARCHITECTURES, ConfigError, config_fields, load_config

_TYPES = {"int": int, "float": float, "str": str}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in config_fields():
        help_text = f.metadata["help"]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), nargs="?", default=None,
                                help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.replace("Optional[", "").rstrip("]")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{help_text} (default {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, type=_TYPES[kind], default=None,
                                choices=f.metadata.get("choices"),
                                help=f"{help_text} (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segpipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment the images under INPUT into OUTPUT")
    segment.add_argument("--config", metavar="FILE", help="YAML config; flags override its keys")
    _add_config_flags(segment)

    export = commands.add_parser(
        "export", help="write COCO files from OUTPUT/predictions at new thresholds (no model)")
    export.add_argument("output", metavar="OUTPUT", help="the OUTPUT of a segment run")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="folder for instances.json, results.json and export.json")
    export.add_argument("--score-threshold", type=float, default=0.5,
                        help="lowest score written (default 0.5; not below the run's score floor)")
    export.add_argument("--mask-threshold", type=float, default=None,
                        help="re-binarise the stored soft masks (default: the run's masks)")
    export.add_argument("--classes", metavar="NAMES_OR_IDS",
                        help="comma-separated COCO names or ids to keep, e.g. person,car")
    export.add_argument("--max-per-image", type=int, metavar="N",
                        help="keep the N highest-scoring annotations per image")
    export.add_argument("--min-area", type=int, default=1, metavar="PIXELS",
                        help="leave out masks with fewer pixels (default 1: no empty masks)")
    export.add_argument("--polygons", action="store_true",
                        help="write polygon segmentations (OpenCV contours) instead of RLE")

    evaluate = commands.add_parser("eval", help="COCO AP of OUTPUT's predictions against ground truth")
    evaluate.add_argument("output", metavar="OUTPUT", help="the OUTPUT of a segment run")
    evaluate.add_argument("--gt", required=True, metavar="ANNOTATIONS.json",
                          help="COCO instances file; images are matched by file_name")
    evaluate.add_argument("--score-threshold", type=float, default=None,
                          help="lowest score evaluated (default: the run's score floor)")
    evaluate.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both")

    render = commands.add_parser("render", help="draw OUTPUT's detections on the images")
    render.add_argument("output", metavar="OUTPUT", help="the OUTPUT of a segment run")
    render.add_argument("--images", required=True, metavar="INPUT",
                        help="the INPUT the run segmented")
    render.add_argument("--to", required=True, metavar="DIR", help="folder for images/ and index.html")
    render.add_argument("--limit", type=int, default=100, help="images to draw (default 100)")
    render.add_argument("--score-threshold", type=float, default=0.5)
    render.add_argument("--classes", metavar="NAMES_OR_IDS")
    render.add_argument("--address", default=None, help="Ray cluster to join (default local)")

    weights = commands.add_parser("weights", help="say where pretrained weights must be cached")
    weights.add_argument("--arch", choices=ARCHITECTURES, default=ARCHITECTURES[0])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "weights":
        return _weights(args.arch)
    if args.command == "export":
        return _export(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "render":
        return _render(args)
    return _segment(args)


def _segment(args: argparse.Namespace) -> int:
    from segpipe.pipeline import run_segment

    overrides = {f.name: getattr(args, f.name) for f in config_fields()}
    try:
        config = load_config(args.config, **overrides)
        run_report = run_segment(config)
    except ConfigError as exc:
        print(f"segpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    for line in run_report.summary_lines():
        print(line)
    print(f"segpipe: wrote {config.output}/predictions, coco/instances.json, coco/results.json, "
          "run.json")
    return 0 if run_report.accounting.complete else 1


def _export(args: argparse.Namespace) -> int:
    from segpipe.categories import parse_classes
    from segpipe.export import ExportOptions, run_export

    try:
        classes = parse_classes(args.classes) if args.classes else None
        if args.max_per_image is not None and args.max_per_image < 1:
            raise ConfigError("--max-per-image must be at least 1")
        options = ExportOptions(score_threshold=args.score_threshold,
                                mask_threshold=args.mask_threshold, classes=classes,
                                max_per_image=args.max_per_image, min_area=args.min_area,
                                polygons=args.polygons)
        summary = run_export(args.output, args.to, options)
    except (ConfigError, ValueError) as exc:
        print(f"segpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"segpipe export: {c['annotations']} annotations on {c['ok']} images from "
          f"{c['detections']} stored detections in {summary['seconds']} s "
          f"({summary['detections_per_s']} detections/s) → {args.to}")
    for name, n in list(c["per_category"].items())[:10]:
        print(f"  {n:>8}  {name}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from segpipe.evaluate import IOU_TYPES, run_eval

    iou_types = IOU_TYPES if args.iou_type == "both" else (args.iou_type,)
    try:
        report = run_eval(args.output, args.gt, args.score_threshold, iou_types)
    except ConfigError as exc:
        print(f"segpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    matching = report["matching"]
    if matching["category_message"]:
        print(f"segpipe eval: NOTE: {matching['category_message']}")
    for iou_type in iou_types:
        print(f"segpipe eval: {iou_type}")
        print(report["tables"][iou_type], end="")
    print(f"segpipe eval: {matching['images_evaluated']} of {matching['ground_truth_images']} "
          f"ground-truth images evaluated, {report['detections']} detections "
          f"(score >= {report['score_threshold']})")
    for key in ("not_predicted", "failed", "size_mismatch"):
        if matching[key]:
            print(f"segpipe eval: {len(matching[key])} ground-truth image(s) {key.replace('_', ' ')}:")
            for name in matching[key][:20]:
                print(f"  {name}")
    print(f"segpipe eval: wrote {args.output.rstrip('/')}/eval.json")
    return 0


def _render(args: argparse.Namespace) -> int:
    from segpipe.categories import parse_classes
    from segpipe.render import run_render

    try:
        classes = parse_classes(args.classes) if args.classes else None
        summary = run_render(args.output, args.images, args.to, args.limit,
                             args.score_threshold, classes, args.address)
    except (ConfigError, ValueError) as exc:
        print(f"segpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"segpipe render: {summary['rendered']} images drawn, {len(summary['errors'])} failed; "
          f"open {summary['index']}")
    for name, error in summary["errors"].items():
        print(f"  {name}: {error}")
    return 0


def _weights(arch: str) -> int:
    """Print the cache path of the pretrained file; exit 0 if it is there, 1 if not."""
    from segpipe.model import pretrained_weights_file

    path = pretrained_weights_file(arch)
    present = path.is_file()
    print(f"{path} ({'present' if present else 'missing'})")
    return 0 if present else 1


if __name__ == "__main__":
    sys.exit(main())

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

    weights = commands.add_parser("weights", help="say where pretrained weights must be cached")
    weights.add_argument("--arch", choices=ARCHITECTURES, default=ARCHITECTURES[0])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "weights":
        return _weights(args.arch)
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


def _weights(arch: str) -> int:
    """Print the cache path of the pretrained file; exit 0 if it is there, 1 if not."""
    from segpipe.model import pretrained_weights_file

    path = pretrained_weights_file(arch)
    present = path.is_file()
    print(f"{path} ({'present' if present else 'missing'})")
    return 0 if present else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of segpipe (``python bench/NAME.py``); each prints its figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def report_json(result: dict, path: Optional[Path] = None) -> None:
    """Print ``result`` as indented JSON, and write it to ``path`` when one is given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.write_text(text + "\n")

"""Every recipe in docs/ runs as written: each Python block that starts with ``# recipe:`` is
run verbatim from a folder holding ``OUTPUT`` (a sharded run) and ``INPUT`` (its images)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from segpipe.annotations.selection import ExportOptions
from segpipe.coco.writer import export_coco
from synthetic import SETTINGS, blob_rows, write_predictions

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 5


def recipes() -> list[tuple[str, str]]:
    """``(title, code)`` of every recipe block of docs/*.md."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            first = code.splitlines()[0]
            if first.startswith("# recipe:"):
                found.append((f"{page.name}: {first[len('# recipe:'):].strip()}", code))
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    rows = blob_rows(IMAGES, 4, 96, 128, smallest=16, largest=40)
    for row in rows:
        path = root / "INPUT" / row["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (row["width"], row["height"])).save(path, format="JPEG")
    write_predictions(root / "OUTPUT", rows)
    export_coco(str(root / "OUTPUT" / "predictions"), str(root / "OUTPUT" / "coco"),
                ExportOptions(0.3), SETTINGS, shard_images=2)
    return root


def test_the_docs_have_their_recipes():
    titles = [title for title, _ in recipes()]
    assert any("torchvision" in t for t in titles) and any("datumaro" in t for t in titles)


@pytest.mark.parametrize("title,code", recipes(), ids=[t for t, _ in recipes()])
def test_a_recipe_runs_as_written(title, code, folder, monkeypatch):
    monkeypatch.chdir(folder)
    names: dict = {"__name__": "__recipe__"}
    exec(compile(code, title, "exec"), names)
    index = json.loads((folder / "OUTPUT" / "coco" / "index.json").read_text())
    if "torchvision" in title:
        assert len(names["dataset"]) == IMAGES
        assert sum(len(target) for _, target in names["dataset"]) == index["annotations"]
    if "datumaro" in title:
        dataset = names["dataset"]
        assert len(dataset) == IMAGES and len(dataset.subsets()) == len(index["shards"]) == 3
        masks = [a for item in dataset for a in item.annotations if type(a).__name__ == "Mask"
                 or type(a).__name__ == "RleMask"]
        assert len(masks) == index["annotations"]

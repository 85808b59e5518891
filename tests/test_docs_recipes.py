"""Every recipe in docs/ runs as written: each Python block that starts with ``# recipe:`` is
run verbatim from a folder holding ``OUTPUT`` (a sharded run with one failed image), ``INPUT``
(its images) and ``GROUND_TRUTH.json`` (a ground truth that the run gets partly wrong), and
what it computes is checked against segpipe's own reading of the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from segpipe.annotations.selection import ExportOptions
from segpipe.coco.shards import load_instances
from segpipe.coco.writer import export_coco
from synthetic import SETTINGS, blob_rows, image_row, write_predictions

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 5
EXPORT_THRESHOLD = 0.3


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
    failed = {**image_row("truncated.jpg", 0, 0, []), "status": "error", "width": None,
              "height": None, "detections": None, "error": "decode: image file is truncated"}
    write_predictions(root / "OUTPUT", rows + [failed])
    export_coco(str(root / "OUTPUT" / "predictions"), str(root / "OUTPUT" / "coco"),
                ExportOptions(EXPORT_THRESHOLD), SETTINGS, shard_images=2)
    # the run's own annotations, every third missing and every fourth of another class
    truth = load_instances(str(root / "OUTPUT" / "coco" / "index.json"))
    category_ids = [c["id"] for c in truth["categories"]]
    kept = [a for n, a in enumerate(truth["annotations"]) if n % 3]
    for n, annotation in enumerate(kept):
        annotation.pop("score", None)
        if n % 4 == 0:
            at = category_ids.index(annotation["category_id"])
            annotation["category_id"] = category_ids[(at + 1) % len(category_ids)]
    (root / "GROUND_TRUTH.json").write_text(json.dumps({**truth, "annotations": kept}))
    return root


def confident_detections(folder: Path, threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """pyarrow's reading of predictions/: ``(file_name, class name, score)`` of every
    detection at ``threshold`` and up."""
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "OUTPUT" / "predictions")
    return [(row["file_name"], detection["category_name"], detection["score"])
            for row in table.to_pylist() for detection in row["detections"] or []
            if detection["score"] >= threshold]


def per_class(detections: list[tuple[str, str, float]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, name, _ in detections:
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_the_docs_have_their_recipes():
    titles = [title for title, _ in recipes()]
    for tool in ("torchvision", "datumaro", "faster-coco-eval", "duckdb", "polars"):
        assert any(tool in title for title in titles), tool


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
    if "faster-coco-eval" in title:
        from segpipe.commands.evaluate import run_eval

        pycocotools = run_eval(str(folder / "OUTPUT"), str(folder / "GROUND_TRUTH.json"),
                               score_threshold=EXPORT_THRESHOLD, iou_types=("segm",))["segm"]
        assert 0.2 < names["segm_ap"] < 0.9   # a run partly wrong: neither all nor nothing
        assert list(names["evaluation"].stats) == pytest.approx(list(pycocotools.values()),
                                                                abs=1e-12)
    if "duckdb" in title:
        expected = per_class(confident_detections(folder))
        assert len(expected) > 1 and dict(names["per_class"]) == expected
    if "polars" in title:
        assert names["failed"].rows() == [("truncated.jpg", "decode: image file is truncated")]
        got = names["confident"].select("file_name", "category_name", "score").rows()
        assert got and sorted(got) == sorted(confident_detections(folder))


def test_the_readme_fits_one_screen_and_every_link_of_the_docs_resolves():
    """The README stays one screen (the detail lives in docs/); every relative link of the
    README and docs/ names a file of the checkout, and every #anchor a heading of it."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 150
    broken = []
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in {
                    _anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

"""The review queue: its signals, its ranking against ground truth (a simulated detector),
and ``segpipe review``'s files, subsets and gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import (
    SETTINGS,
    blob_rows,
    image_errors,
    image_row,
    simulated_review_set,
    write_predictions,
)
from test_cli import run_cli

from segpipe.review import signals
from segpipe.review.queue import rank, score_images


def test_signals_measure_what_they_say():
    s = signals.SignalSettings(score_threshold=0.5, margin=0.1)
    w = signals.borderline_weights(np.array([0.5, 0.55, 0.6, 0.9, 0.42]), s)
    assert w == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.2])
    sharp = np.zeros((1, 28, 28), np.float32)
    sharp[0, 5:20, 5:20] = 1.0
    flat = np.full((1, 28, 28), 0.5, np.float32)
    ramp = np.tile(np.linspace(0, 1, 28, dtype=np.float32), (1, 28, 1))
    assert signals.mask_uncertainty(sharp)[0] == 0.0 and signals.mask_uncertainty(flat)[0] == 1.0
    assert 0.4 < signals.mask_uncertainty(ramp)[0] < 0.6
    assert signals.threshold_sensitivity(sharp)[0] == 0.0
    assert signals.threshold_sensitivity(ramp)[0] == pytest.approx(1 - 9 / 20, abs=0.05)
    assert signals.rarity(np.array([100, 10, 1])) == pytest.approx(
        [0.0, 1 - np.log(11) / np.log(101), 1 - np.log(2) / np.log(101)])


def test_the_top_of_the_queue_holds_more_mistakes_than_a_random_order(tmp_path):
    """On a set with exact ground truth and a simulated detector whose mistakes grow with
    difficulty (a plumbing check of signals and ranking, not of a real model)."""
    rows, truth = simulated_review_set(150, seed=1)
    mistakes = {r["file_name"]: image_errors(r, truth[r["file_name"]]) > 0 for r in rows}
    write_predictions(tmp_path, rows)
    ranked = rank(score_images(str(tmp_path / "predictions"), SETTINGS).table)
    order = [mistakes[name] for name in ranked.column("file_name").to_pylist()]
    overall = np.mean(order)
    assert 0.2 < overall < 0.9
    assert np.mean(order[:30]) > overall + 0.1   # top 20%
    priority = ranked.column("priority").to_numpy()
    assert (np.diff(priority) <= 0).all()


@pytest.fixture(scope="module")
def review_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("review") / "run"
    rows = blob_rows(20, 8, 120, 160, seed=5)
    rows.append({**image_row("broken.jpg", 0, 0, []), "status": "error", "error": "cannot decode",
                 "width": None, "height": None, "detections": None})
    write_predictions(run, rows, rows_per_file=6)
    return run


def test_review_writes_the_ranking_and_subsets(review_run, tmp_path):
    from pycocotools.coco import COCO

    to = tmp_path / "queue"
    result = run_cli("review", str(review_run), "--to", str(to), "--top", "5", "--subset", "coco")
    assert result.returncode == 0, result.stderr
    assert "20 images ranked" in result.stdout
    records = [json.loads(line) for line in (to / "review.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in records] == list(range(1, 21))   # every ok image, once
    assert len({r["file_name"] for r in records}) == 20
    assert all(a["priority"] >= b["priority"] for a, b in zip(records, records[1:]))
    assert all(r["priority"] == pytest.approx(sum(r[s] for s in signals.SIGNALS), abs=1e-3)
               for r in records)
    assert any(r["reasons"] for r in records)
    flat = list(csv.DictReader((to / "review.csv").open()))
    assert [row["file_name"] for row in flat] == [r["file_name"] for r in records]
    # what docs/labelling.md promises: duckdb and polars read it with its types
    import duckdb
    import polars as pl

    by_polars = pl.read_csv(to / "review.csv")
    by_duckdb = duckdb.read_csv(str(to / "review.csv"))
    assert by_polars.columns == by_duckdb.columns == list(flat[0])
    assert by_polars["priority"].dtype == pl.Float64 and by_polars["rank"].dtype == pl.Int64
    assert by_polars.select("file_name", "priority").rows() == \
        by_duckdb.select("file_name, priority").fetchall() == \
        [(r["file_name"], pytest.approx(r["priority"], abs=1e-6)) for r in records]
    coco = COCO(str(to / "top" / "instances.json"))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == \
        sorted(r["file_name"] for r in records[:5])
    summary = json.loads((to / "review.json").read_text())
    assert summary["subset"]["images"] == 5 and summary["images"] == 20

    ls = run_cli("review", str(review_run), "--to", str(tmp_path / "ls"), "--top", "4",
                 "--subset", "label-studio", "--image-root", "s3://b/p/")
    assert ls.returncode == 0, ls.stderr
    tasks = json.loads((tmp_path / "ls" / "top" / "tasks.json").read_text())
    assert [t["data"]["review_rank"] for t in tasks] == [1, 2, 3, 4]
    assert [t["data"]["file_name"] for t in tasks] == [r["file_name"] for r in records[:4]]


def test_review_mistakes_are_one_line_exit_2(review_run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "review.csv").write_text("my own notes\n")
    for args, words in ((["--subset", "coco"], "--subset needs --top"),
                        (["--top", "0"], "--top must be at least 1"),
                        (["--score-threshold", "0.01"], "--score-threshold must be in"),
                        (["--top", "3", "--subset", "label-studio"], "needs --image-root")):
        result = run_cli("review", str(review_run), "--to", str(tmp_path / "q"), *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("review", str(review_run), "--to", str(tmp_path / "mine"))
    assert result.returncode == 2 and "review.csv" in result.stderr
    assert (tmp_path / "mine" / "review.csv").read_text() == "my own notes\n"


@pytest.mark.ray
def test_review_gallery_shows_the_queue_in_order(review_run, tmp_path):
    images = tmp_path / "photos" / "blobs"
    images.mkdir(parents=True)
    for k in range(20):
        Image.new("RGB", (160, 120), (k * 10, 80, 120)).save(images / f"{k:04d}.jpg")
    to = tmp_path / "queue"
    result = run_cli("review", str(review_run), "--to", str(to), "--top", "3",
                     "--images", str(tmp_path / "photos"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (to / "review.jsonl").read_text().splitlines()]
    page = (to / "gallery" / "index.html").read_text()
    positions = [page.index(f">{r['file_name']} · ") for r in records[:3]]
    assert positions == sorted(positions)
    assert f">{records[3]['file_name']} · " not in page
    assert "#1 priority" in page
    assert len(list((to / "gallery" / "images" / "blobs").iterdir())) == 3

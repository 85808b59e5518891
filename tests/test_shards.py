"""Sharded COCO output: complete shards that add up to the single files, the same bytes however
the predictions were written, the index, the merge, and the tools that read shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from segpipe.annotations.selection import ExportOptions
from segpipe.coco.shards import instances_files, load_instances, read_index
from segpipe.coco.writer import export_coco
from segpipe.commands.export import check_export, check_export_target, run_export
from segpipe.config import ConfigError
from segpipe.output.run_folder import predictions_dir
from synthetic import SETTINGS, box_detection, image_row, write_predictions
from test_cli import run_cli

IMAGES = 23


def rows(seed: int = 0) -> list[dict]:
    """``IMAGES`` ok rows with 0-5 detections each (scores on both sides of 0.5) and two error
    rows, in a shuffled order."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(IMAGES):
        dets = [box_detection(1 + int(rng.integers(0, 3)), float(rng.uniform(0.1, 1.0)),
                              int(rng.integers(0, 40)), int(rng.integers(0, 40)),
                              int(rng.integers(1, 20)), int(rng.integers(1, 20)), 64, 64)
                for _ in range(int(rng.integers(0, 6)))]
        made.append(image_row(f"dir{i % 3}/img_{i:03d}.jpg", 64, 64,
                              sorted(dets, key=lambda d: -d["score"])))
    for name in ("broken_a.jpg", "broken_b.jpg"):
        made.append({**image_row(name, 0, 0, []), "status": "error", "error": "decode: bad"})
    random.Random(seed).shuffle(made)
    return made


@pytest.fixture()
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    write_predictions(out, rows(), rows_per_file=7)
    return out


def export(output: Path, to: Path, shard_images: int, threshold: float = 0.5) -> dict:
    options = ExportOptions(score_threshold=threshold)
    checked = check_export(str(output), options)
    check_export_target(str(to))
    return run_export(str(output), str(to), options, checked=checked, shard_images=shard_images)


def coco_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix == ".json" and p.name != "export.json" and not p.name.startswith(".")}


def test_shards_are_complete_datasets_that_add_up_to_the_single_files(run, tmp_path):
    export(run, tmp_path / "single", shard_images=0)
    summary = export(run, tmp_path / "sharded", shard_images=5)
    single = json.loads((tmp_path / "single" / "instances.json").read_text())
    single_results = json.loads((tmp_path / "single" / "results.json").read_text())
    index = read_index(str(tmp_path / "sharded"))
    assert [s["instances"] for s in index["shards"]] == \
        [f"instances-{k:05d}-of-00005.json" for k in range(5)]
    assert [s["images"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["images"] == IMAGES == len(single["images"])
    assert index["annotations"] == len(single["annotations"]) == summary["counts"]["annotations"] > 20
    assert summary["shards"] == 5

    joined_images, joined_annotations, joined_results = [], [], []
    for entry in index["shards"]:
        path = tmp_path / "sharded" / entry["instances"]
        shard = json.loads(path.read_text())
        assert shard["categories"] == single["categories"]          # the whole table each
        assert shard["info"] == single["info"]
        image_ids = {i["id"] for i in shard["images"]}
        assert {a["image_id"] for a in shard["annotations"]} <= image_ids   # self-contained
        assert len(shard["annotations"]) == entry["annotations"]
        if shard["annotations"]:
            assert shard["annotations"][0]["id"] == entry["first_annotation_id"]
        assert shard["images"][0]["file_name"] == entry["first_file_name"]
        coco = COCO(str(path))                                      # each loads on its own
        assert len(coco.getImgIds()) == entry["images"]
        assert len(coco.getAnnIds()) == entry["annotations"]
        joined_images += shard["images"]
        joined_annotations += shard["annotations"]
        joined_results += json.loads((tmp_path / "sharded" / entry["results"]).read_text())
    assert joined_images == single["images"]
    assert [i["file_name"] for i in joined_images] == sorted(i["file_name"] for i in joined_images)
    assert joined_annotations == single["annotations"]
    assert [a["id"] for a in joined_annotations] == list(range(1, len(joined_annotations) + 1))
    assert joined_results == single_results
    assert load_instances(str(tmp_path / "sharded" / "index.json")) == single
    assert load_instances(str(tmp_path / "sharded")) == single


def test_the_same_predictions_give_the_same_bytes_however_their_files_are_arranged(tmp_path):
    made = rows()
    one_file, resumed_like = tmp_path / "a", tmp_path / "b"
    write_predictions(one_file, sorted(made, key=lambda r: r["file_name"]), rows_per_file=1000)
    # another order, cut at other places: what a resumed run or other writers leave
    write_predictions(resumed_like, made[::-1][:9], rows_per_file=2)
    write_predictions(resumed_like, made[::-1][9:], rows_per_file=6)
    for shard_images in (0, 4, 100):
        export(one_file, tmp_path / f"a{shard_images}", shard_images)
        export(resumed_like, tmp_path / f"b{shard_images}", shard_images)
        first, second = coco_bytes(tmp_path / f"a{shard_images}"), \
            coco_bytes(tmp_path / f"b{shard_images}")
        assert first == second and len(first) >= 3


def test_re_exporting_replaces_its_own_shards_and_refuses_anyone_elses(run, tmp_path):
    to = tmp_path / "to"
    export(run, to, shard_images=4)
    assert len(list(to.glob("instances-*.json"))) == 6
    export(run, to, shard_images=0)   # the merge: single files, the shards gone
    assert sorted(p.name for p in to.glob("*.json") if not p.name.startswith(".")) == \
        ["export.json", "index.json", "instances.json", "results.json"]
    assert len(read_index(str(to))["shards"]) == 1
    export(run, to, shard_images=10)
    assert sorted(p.name for p in to.glob("instances*.json")) == \
        [f"instances-{k:05d}-of-00003.json" for k in range(3)]
    assert not (to / "instances.json").exists()

    theirs = to / "instances-00007-of-00009.json"
    theirs.write_text("{}")
    with pytest.raises(ConfigError, match="did not write"):
        check_export_target(str(to))
    assert theirs.read_text() == "{}"


def test_export_cli_takes_coco_shard_images_and_refuses_a_negative_count(run, tmp_path):
    done = run_cli("export", str(run), "--to", str(tmp_path / "x"), "--coco-shard-images", "10")
    assert done.returncode == 0, done.stderr
    assert [s["images"] for s in read_index(str(tmp_path / "x"))["shards"]] == [10, 10, 3]
    refused = run_cli("export", str(run), "--to", str(tmp_path / "y"), "--coco-shard-images", "-1")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_a_run_without_ok_images_still_writes_a_valid_dataset(tmp_path):
    out = tmp_path / "run"
    write_predictions(out, [{**image_row("bad.jpg", 0, 0, []), "status": "error",
                             "error": "decode: bad"}])
    counts = export_coco(predictions_dir(str(out)), str(tmp_path / "coco"),
                         ExportOptions(score_threshold=0.5), SETTINGS, shard_images=10)
    assert counts.ok == 0 and counts.errors == 1
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    assert coco.getImgIds() == [] and len(coco.getCatIds()) == 80
    assert read_index(str(tmp_path / "coco"))["shards"][0]["first_file_name"] is None


def test_torchvision_reads_a_sharded_dataset_as_one(run, tmp_path):
    """The example of docs/output.md: one CocoDetection per shard, joined by ConcatDataset."""
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import CocoDetection

    images = tmp_path / "images"
    for row in rows():
        path = images / row["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64)).save(path, format="PNG")
    export(run, tmp_path / "coco", shard_images=5)
    export(run, tmp_path / "single", shard_images=0)
    single = json.loads((tmp_path / "single" / "instances.json").read_text())

    # --- the documented example ---
    index = json.loads((tmp_path / "coco" / "index.json").read_text())
    dataset = ConcatDataset([CocoDetection(str(images), str(tmp_path / "coco" / shard["instances"]))
                             for shard in index["shards"]])
    # ---
    assert len(dataset) == IMAGES
    annotations = [a for _, target in dataset for a in target]
    assert sorted(annotations, key=lambda a: a["id"]) == single["annotations"]
    assert instances_files(str(tmp_path / "coco")) == \
        [str(tmp_path / "coco" / s["instances"]) for s in index["shards"]]


@pytest.mark.ray
def test_ray_tasks_write_the_same_bytes_as_one_process(run, tmp_path, local_ray):
    options = ExportOptions(score_threshold=0.3)
    for parallel in (False, True):
        export_coco(predictions_dir(str(run)), str(tmp_path / str(parallel)), options, SETTINGS,
                    parallel=parallel, shard_images=6)
    assert coco_bytes(tmp_path / "False") == coco_bytes(tmp_path / "True")
    assert len(coco_bytes(tmp_path / "True")) == 9   # 4 shards × 2 files + index


def test_eval_takes_sharded_ground_truth_as_one_dataset(run, tmp_path):
    from segpipe.commands.evaluate import run_eval

    export(run, tmp_path / "single", shard_images=0)
    export(run, tmp_path / "sharded", shard_images=5)
    whole = run_eval(str(run), str(tmp_path / "single" / "instances.json"))
    sharded = run_eval(str(run), str(tmp_path / "sharded" / "index.json"))
    assert sharded["matching"]["images_evaluated"] == IMAGES
    assert sharded["segm"] == whole["segm"] and sharded["bbox"] == whole["bbox"]
    assert whole["segm"]["AP"] > 0.5


def test_accounting_names_missing_duplicated_and_unexpected_images():
    import pyarrow as pa

    from segpipe.commands.report import account_for_inputs, cut_short

    listing = pa.table({"image_id": pa.array([1, 2, 3], pa.int64()), "file_name": ["a", "b", "c"]})
    images = pa.table({"image_id": pa.array([2, 2, 4, 5], pa.int64()),
                       "file_name": ["b", "b", "d", "e.tar"],
                       "status": ["ok", "ok", "ok", "error"],
                       "error": [None, None, None, "read: x (the shard ends early)"]})
    accounting = account_for_inputs(listing, images)
    assert (accounting.listed, accounting.written) == (3, 4)
    assert accounting.missing == ["a", "c"] and accounting.duplicated == ["b"]
    assert accounting.unexpected == ["d", "e.tar"] and not accounting.complete
    unlisted = account_for_inputs(None, images)
    assert unlisted.duplicated == ["b"] and unlisted.listed is None and not unlisted.missing
    assert account_for_inputs(listing.slice(1, 1), images.slice(0, 1)).complete
    from segpipe.io.sources import READ_CUT

    cut = images.set_column(3, "error", pa.array([None, None, None, f"read: {READ_CUT}"]))
    assert cut_short(cut) == ["e.tar"] and cut_short(images) == []


def test_the_to_do_list_is_the_listing_less_the_images_done():
    import pyarrow as pa

    from segpipe.commands.segment import remaining

    listing = pa.table({"image_id": pa.array([5, 1, 9, 3], pa.int64()),
                        "file_name": ["e", "a", "i", "c"]})
    assert remaining(listing, {1, 9, 42}).column("file_name").to_pylist() == ["e", "c"]
    assert remaining(listing, set()).equals(listing)
    assert remaining(listing, {5, 1, 9, 3}).num_rows == 0

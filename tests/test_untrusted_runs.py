"""A run folder is untrusted: someone who can edit predictions/, coco/index.json or a ground-truth
file must not crash a command, make it spin or allocate without bound, or get a value into a
file people open. Each damaged detection or image row is left out, counted and named; a
damaged index or ground truth is one line, exit 2. (Hostile world, round three, part 2.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe import cli
from segpipe.coco.ground_truth import ground_truth_problem
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import ExportFormat, run_export
from segpipe.output.damage import rle_ones
from synthetic import box_detection, image_row, write_predictions


def strict_json(path: Path):
    """The JSON of ``path``, refusing the NaN and Infinity that Python's reader lets through."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def run_with(tmp_path: Path, *tampered: tuple[str, dict]) -> Path:
    """A run of two good images and one image per ``(name, detection changes)``, each with a
    good detection and the changed one."""
    rows = [image_row(f"good{k}.jpg", 64, 48, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)])
            for k in range(2)]
    for name, changes in tampered:
        good = box_detection(3, 0.8, 30, 20, 10, 10, 48, 64)
        bad = {**box_detection(1, 0.7, 2, 2, 8, 8, 48, 64), **changes}
        rows.append(image_row(name, 64, 48, [good, bad]))
    write_predictions(tmp_path / "run", rows)
    return tmp_path / "run"


def garbage_counts() -> str:
    return "".join(chr(48 + (k * 37) % 64) for k in range(400))


TAMPERED = [
    ("nan.jpg", {"score": math.nan}),
    ("inf.jpg", {"score": math.inf}),
    ("bbox.jpg", {"bbox": [1.0, math.inf, 3.0, 4.0]}),
    ("garbage.jpg", {"segmentation": {"size": [48, 64], "counts": garbage_counts()}}),
    ("negative.jpg", {"segmentation": {"size": [48, 64], "counts": "1?"}}),
    ("huge.jpg", {"segmentation": {"size": [100000, 100000], "counts": "0"}}),
    ("wide.jpg", {"segmentation": {"size": [48, -5], "counts": "0"}}),
    ("soft.jpg", {"soft_mask": b"1234567"}),
    ("area.jpg", {"area": 5}),
    ("a_renamed.jpg", {"category_name": "\x1b]0;pwned\x07\x1b[31mzebra"}),
]


def test_rle_counts_are_checked_as_pycocotools_reads_them():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.asfortranarray(rng.random((37, 53)) < rng.random())
        rle = mask_utils.encode(mask.astype(np.uint8))
        assert rle_ones(rle["counts"].decode(), 37 * 53) == int(mask.sum())
        assert rle_ones(rle["counts"].decode(), 37 * 53 + 1) == -1      # runs must cover it all
    assert rle_ones(garbage_counts(), 48 * 64) == -1
    assert rle_ones("1?", 48 * 64) == -1          # a negative run
    assert rle_ones("\x80abc", 10) == -1          # not ASCII
    assert rle_ones(None, 10) == -1


def test_damaged_detections_are_left_out_counted_and_named_in_every_format(tmp_path):
    """An export judges what it reads: soft masks only when it re-pastes them."""
    run = run_with(tmp_path, *TAMPERED)
    coco = run_export(str(run), str(tmp_path / "coco"), ExportOptions(0.5))
    assert coco["counts"]["damaged_left_out"] == len(TAMPERED) - 1
    assert coco["counts"]["annotations"] == 2 + len(TAMPERED) + 1   # every good detection
    named = coco["counts"]["damaged"]
    assert len(named) == 5 and "'bbox.jpg' detection 1: its bbox" in " ".join(named)
    for name in ("instances.json", "results.json"):
        strict_json(tmp_path / "coco" / name)
    from pycocotools.coco import COCO

    COCO(str(tmp_path / "coco" / "instances.json"))
    tasks = run_export(str(run), str(tmp_path / "ls"), ExportOptions(0.5),
                       export_format=ExportFormat("label-studio", "s3://b/"))
    assert tasks["counts"]["damaged_left_out"] == len(TAMPERED) - 1
    assert [len(t["predictions"][0]["result"]) for t in strict_json(tmp_path / "ls" / "tasks.json")
            if t["data"]["file_name"] != "soft.jpg"] == [1] * (2 + len(TAMPERED) - 1)
    yolo = run_export(str(run), str(tmp_path / "yolo"), ExportOptions(0.5),
                      export_format=ExportFormat("yolo"))
    assert yolo["counts"]["damaged_left_out"] == len(TAMPERED) - 1
    # a new mask threshold re-pastes the stored soft masks: the 7-byte one is not among them
    again = run_export(str(run), str(tmp_path / "coco3"), ExportOptions(0.5, mask_threshold=0.3))
    assert again["counts"]["damaged_left_out"] == len(TAMPERED)


def test_a_damaged_run_costs_no_time_or_memory_and_prints_nothing_raw(tmp_path):
    """In a child process held to 3 GiB of address space: a 100000×100000 mask decoded would
    take 9.3 GiB; garbage counts handed to pycocotools spun for minutes."""
    run = run_with(tmp_path, *TAMPERED)
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
              "from segpipe.cli import main; sys.exit(main(sys.argv[1:]))")
    for args in (["--format", "yolo"], ["--format", "label-studio", "--image-root", "/x/"], []):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script, "export", str(run), "--to",
                               str(tmp_path / f"out{len(args)}"), "--no-progress", *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert time.perf_counter() - start < 60
        assert f"{len(TAMPERED) - 1} left out: damaged in predictions/" in done.stdout
        assert "\x1b" not in done.stdout + done.stderr and "\\x1b]0;pwned" in done.stdout


def test_eval_leaves_damaged_detections_out_and_ends(tmp_path, capsys):
    run = run_with(tmp_path, *TAMPERED)
    export = run_export(str(run), str(tmp_path / "gt"), ExportOptions(0.5))
    assert export["counts"]["annotations"]
    assert cli.main(["eval", str(run), "--gt", str(tmp_path / "gt" / "instances.json")]) == 0
    out = capsys.readouterr().out
    assert f"{len(TAMPERED) - 1} detection(s) left out: damaged in predictions/" in out
    assert "index created" not in out and "Loading and preparing" not in out
    assert "segpipe's own export" in out   # its boxes are the masks': say so


@pytest.mark.parametrize("width,height", [(-5, 48), (0, 48), (64, None), (2_000_000, 2_000)])
def test_an_image_row_of_no_image_size_is_an_error_row_named(tmp_path, width, height):
    rows = [image_row("good.jpg", 64, 48, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)]),
            image_row("odd.jpg", width, height, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)])]
    write_predictions(tmp_path / "run", rows)
    for export_format in (ExportFormat(), ExportFormat("yolo"), ExportFormat("label-studio", "/x/")):
        summary = run_export(str(tmp_path / "run"), str(tmp_path / export_format.name), ExportOptions(0.5),
                             export_format=export_format)
        counts = summary["counts"]
        assert (counts["ok"], counts["errors"], counts["damaged_images"]) == (1, 1, 1)
        assert counts["damaged"] == ["'odd.jpg': its width and height are not those of an image"]


@pytest.mark.parametrize("name", ["../sub/notes.jpg", "a/../../x.jpg", "/etc/x.jpg", "a//b.jpg",
                                  "line\nbreak.jpg", "nel\x85.jpg", "sep\u2028.jpg", "back\\slash.jpg"])
def test_names_segpipe_never_writes_decide_nothing(tmp_path, name):
    (tmp_path / "yolo" / "sub").mkdir(parents=True)
    (tmp_path / "yolo" / "sub" / "notes.txt").write_text("mine\n")
    rows = [image_row("good.jpg", 64, 48, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)]),
            image_row(name, 64, 48, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)])]
    write_predictions(tmp_path / "run", rows)
    summary = run_export(str(tmp_path / "run"), str(tmp_path / "yolo"), ExportOptions(0.5),
                         export_format=ExportFormat("yolo", val_fraction=0.0))
    assert summary["counts"]["damaged_images"] == 1
    assert (tmp_path / "yolo" / "sub" / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "yolo" / "train.txt").read_text() == "./images/good.jpg\n"
    assert sorted(p.name for p in (tmp_path / "yolo" / "labels").rglob("*")) == ["good.txt"]


@pytest.mark.parametrize("index", [
    {"shards": [{"instances": "../../x.json", "results": "results.json"}]},
    {"shards": [{"instances": "/etc/passwd", "results": "results.json"}]},
    {"shards": [{"instances": "sub/instances.json", "results": "results.json"}]},
    {"shards": []},
    {"shards": "instances.json"},
    {"shards": [7]},
])
def test_an_index_names_only_files_of_its_own_folder(tmp_path, capsys, index):
    run = run_with(tmp_path)
    run_export(str(run), str(tmp_path / "gt"), ExportOptions(0.5))
    # a valid COCO file outside the index's folder: opening it would evaluate against it
    (tmp_path / "x.json").write_text((tmp_path / "gt" / "instances.json").read_text())
    path = tmp_path / "gt" / "index.json"
    path.write_text(json.dumps({"format": "segpipe-coco-shards", "shard_images": 1, **index}))
    assert cli.main(["eval", str(run), "--gt", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "Traceback" not in err


GOOD_GT = {"images": [{"id": 1, "file_name": "good0.jpg", "width": 64, "height": 48}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10],
                            "area": 200, "iscrowd": 0,
                            "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]}],
           "categories": [{"id": 1, "name": "person"}]}


@pytest.mark.parametrize("change", [
    {"images": [1, 2]},
    {"images": [{"id": 1, "file_name": "a.jpg"}]},
    {"annotations": [{"id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1}]},
    {"annotations": [{"id": 1, "image_id": [1], "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1}]},
    {"annotations": [{**GOOD_GT["annotations"][0], "bbox": [0, 0, math.nan, 1]}]},
    {"annotations": [{**GOOD_GT["annotations"][0], "segmentation": {"size": [48, 64],
                                                                   "counts": garbage_counts()}}]},
    {"annotations": [{**GOOD_GT["annotations"][0], "segmentation": {"size": [48, 64], "counts": [5, -1]}}]},
    {"annotations": [{**GOOD_GT["annotations"][0], "segmentation": [[1, 2, 3]]}]},
    {"categories": [{"name": "person"}]},
    {"categories": {"id": 1}},
    {"categories": [{"id": 1}]},
    {"categories": [{"id": 1, "name": "person"}, {"id": 1, "name": "car"}]},
    {"annotations": [GOOD_GT["annotations"][0]] * 2},   # one id twice: COCO would keep one
    {"annotations": [{**GOOD_GT["annotations"][0], "area": -5}]},
    {"annotations": [{**GOOD_GT["annotations"][0], "iscrowd": "yes"}]},
    # far outside the image: pycocotools' rasteriser overflows (it crashed the process)
    {"annotations": [{**GOOD_GT["annotations"][0], "segmentation": [[0, 0, 1e9, 0, 1e9, 1e9]]}]},
])
def test_malformed_ground_truth_is_one_line_naming_file_and_entry(tmp_path, capsys, change):
    run = run_with(tmp_path)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({**GOOD_GT, **change}))
    start = time.perf_counter()
    assert cli.main(["eval", str(run), "--gt", str(gt)]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(gt) in err and "Traceback" not in err
    assert ground_truth_problem(GOOD_GT) is None


def test_ground_truth_without_iscrowd_is_evaluated_as_objects_and_said(tmp_path, capsys):
    run = run_with(tmp_path)
    gt = tmp_path / "gt.json"
    annotation = {k: v for k, v in GOOD_GT["annotations"][0].items() if k != "iscrowd"}
    gt.write_text(json.dumps({**GOOD_GT, "annotations": [annotation]}))   # pycocotools failed
    assert cli.main(["eval", str(run), "--gt", str(gt)]) == 0
    out = capsys.readouterr().out
    assert "1 ground-truth annotations without iscrowd (the first: id 1)" in out
    assert json.loads((run / "eval.json").read_text())["segm"]["AP"] >= 0


@pytest.mark.ray
def test_render_draws_what_is_intact_and_names_what_is_not(tmp_path, capsys):
    """A mask of another size than its image failed the whole render (a Ray traceback, no
    index.html): now the damaged detections are left out and named, the rest drawn."""
    from PIL import Image

    run = run_with(tmp_path, *TAMPERED)
    images = tmp_path / "images"
    images.mkdir()
    for name in ["good0.jpg", "good1.jpg", *(name for name, _ in TAMPERED)]:
        Image.new("RGB", (64, 48)).save(images / name)
    code = cli.main(["render", str(run), "--images", str(images), "--to", str(tmp_path / "g"),
                     "--score-threshold", "0.5", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "g" / "index.html").exists()
    assert f"{2 + len(TAMPERED)} images drawn, 0 failed" in out
    assert f"{len(TAMPERED)} image(s) or detection(s) left out: damaged in predictions/" in out
    assert "\x1b" not in out


def _settings_changed(path: list[str], value) -> dict:
    from synthetic import SETTINGS

    values = json.loads(json.dumps(SETTINGS.to_json()))
    place = values
    for key in path[:-1]:
        place = place[key]
    if value is KeyError:
        del place[path[-1]]
    else:
        place[path[-1]] = value
    return values


@pytest.mark.parametrize("recorded,named", [
    (b"not json{", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"[" * 100_000, "maximum recursion depth"),
    (json.dumps(_settings_changed(["mask_threshold"], math.nan)).encode(), "NaN is no JSON number"),
    (_settings_changed(["model"], KeyError), "no model"),
    (_settings_changed(["model", "hidden"], 1), "unknown model.hidden"),
    (_settings_changed(["mask_threshold"], 5), "mask_threshold must be in [0, 1)"),
    (_settings_changed(["mask_threshold"], "0.5"), "mask_threshold is '0.5'"),
    (_settings_changed(["soft_mask_dtype"], "float64"), "soft_mask_dtype is 'float64'"),
    (_settings_changed(["model", "min_size"], -5), "min_size must be at least 1"),
    (_settings_changed(["model", "arch"], "evil"), "arch must be one of"),
    (_settings_changed(["model", "mask_frame"], "nope"), "model.mask_frame is 'nope'"),
    (_settings_changed(["tiles"], {"size": 0, "overlap": -1}), "tiles.size is 0"),
    (_settings_changed(["tiles"], {"size": 640, "overlap": 900}), "tile_overlap (900.0) must be less"),
    (_settings_changed(["weights_sha256"], "\x1b]0;pwned\x07"), "weights_sha256 is '\\x1b]0;pwned"),
])
def test_run_settings_in_a_files_footer_are_checked_before_any_work(tmp_path, capsys, recorded,
                                                                      named):
    """Whoever edits predictions/ can rewrite the settings each file's footer records: every
    command refuses settings segpipe could not have written, in one line naming the file,
    before writing anything."""
    import pyarrow.parquet as pq

    from segpipe.schema import RUN_SETTINGS_KEY

    run = run_with(tmp_path)
    export = run_export(str(run), str(tmp_path / "gt"), ExportOptions(0.5))   # before tampering
    assert export["counts"]["annotations"]
    (part,) = (run / "predictions").glob("part-*.parquet")
    table = pq.read_table(part)
    raw = recorded if isinstance(recorded, bytes) else json.dumps(recorded).encode()
    pq.write_table(table.replace_schema_metadata({RUN_SETTINGS_KEY: raw}), part)
    for args in (["export", str(run), "--to", str(tmp_path / "x")],
                 ["export", str(run), "--to", str(tmp_path / "y"), "--format", "yolo"],
                 ["review", str(run), "--to", str(tmp_path / "r")],
                 ["eval", str(run), "--gt", str(tmp_path / "gt" / "instances.json")]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "\x1b" not in err, err
        assert "predictions/part-" in err and named in err, err
    assert not any((tmp_path / name).exists() for name in ("x", "y", "r"))
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("text", ["[]", '"x"', '{"config": []}', "{bad", "[" * 100_000, '{"config": {"input": 5}}',
                                  '{"config": {"image_column": ["x"], "name_column": "name"}}'])
def test_run_json_is_only_a_hint_and_never_a_crash(tmp_path, text):
    """run.json is untrusted too: render's table columns and the INPUT an export must not
    write into come from it when it holds strings there, and from nowhere when not."""
    from segpipe.commands.render import _table_columns
    from segpipe.output import run_folder

    (tmp_path / "run.json").write_text(text)
    named = "name" if "name_column" in text else None
    assert _table_columns(str(tmp_path)) == ("image", named)
    assert run_folder.run_input(str(tmp_path)) is None


def test_an_image_written_twice_is_exported_once_and_named(tmp_path):
    """A file of predictions/ holding one image in two rows (an API run of duplicate
    pictures, an edited file): every export writes it once, the repeat counted and named."""
    from pycocotools.coco import COCO

    detection = box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)
    rows = [image_row("a.jpg", 64, 48, [detection]), image_row("b.jpg", 64, 48, [detection]),
            image_row("a.jpg", 64, 48, [detection])]
    write_predictions(tmp_path / "run", rows)
    for export_format in (ExportFormat(), ExportFormat("yolo", val_fraction=0.0),
                          ExportFormat("label-studio", "/x/")):
        summary = run_export(str(tmp_path / "run"), str(tmp_path / export_format.name),
                             ExportOptions(0.5), export_format=export_format)
        counts = summary["counts"]
        assert (counts["ok"], counts["damaged_images"]) == (2, 1), counts
        assert counts["damaged"] == ["'a.jpg': an earlier row holds the same image (its "
                                     "file_name and image_id): each image is written once"]
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    assert sorted(image["file_name"] for image in coco.dataset["images"]) == ["a.jpg", "b.jpg"]
    assert len(coco.dataset["annotations"]) == 2
    assert (tmp_path / "yolo" / "train.txt").read_text().splitlines() == \
        ["./images/a.jpg", "./images/b.jpg"]
    tasks = json.loads((tmp_path / "label-studio" / "tasks.json").read_text())
    assert sorted(task["data"]["file_name"] for task in tasks) == ["a.jpg", "b.jpg"]

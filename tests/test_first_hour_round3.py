"""The Python and command-line user's first hour, round three: words that fit where they are
read, random weights said wherever detections are shown, galleries that can be read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from segpipe import cli
from segpipe.api import file_names, python_terms
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.commands.export import ExportFormat, run_export
from segpipe.commands.render import draw_detections, gallery_html
from segpipe.commands.report import Accounting, RunReport
from segpipe.config import ConfigError, SegmentConfig, load_config
from segpipe.io.sources import image_id_for
from synthetic import SETTINGS, blob_rows, write_predictions


def test_api_errors_name_parameters_not_flags():
    said = ("OUTPUT/predictions already holds 3 prediction file(s) from an earlier run; pass "
            "--resume to finish it, --overwrite to replace it, or choose another OUTPUT; "
            "rerun segment with --no-soft-masks or a lower --score-floor")
    assert python_terms(said) == (
        "output/predictions already holds 3 prediction file(s) from an earlier run; pass "
        "resume=True to finish it, overwrite=True to replace it, or choose another output; "
        "rerun segment with soft_masks=False or a lower score_floor")
    import segpipe

    with pytest.raises(segpipe.ConfigError) as refused:
        segpipe.export("/nonexistent/run", "/tmp/x")
    assert "--" not in str(refused.value)


def test_api_arguments_are_checked_by_their_types_and_taken_as_python_gives_them(tmp_path):
    """A string threshold failed deep in a comparison, a list of classes with an
    AttributeError, None for ``to`` with "not iterable"; paths and numpy numbers are what
    Python code hands over."""
    import pathlib

    import numpy as np

    import segpipe
    from test_untrusted_runs import run_with

    run = run_with(tmp_path)
    for call, said in [
            (lambda: segpipe.export(str(run), str(tmp_path / "a"), score_threshold="0.5"),
             "export(): score_threshold must be a number, got '0.5'"),
            (lambda: segpipe.export(str(run), str(tmp_path / "a"), classes=[None]),
             "export(): classes must be a string or a list or None, got [None]"),
            (lambda: segpipe.export_labels(str(run), None, "yolo"),
             "export_labels(): to must be a string, got None"),
            (lambda: segpipe.review_queue(str(run), str(tmp_path / "r"), top=2.5),
             "review_queue(): top must be an integer or None, got 2.5"),
            (lambda: segpipe.export(str(run), str(tmp_path / "a"), max_per_image=0),
             "max_per_image must be at least 1"),
            (lambda: segpipe.as_config([1, 2]), "as_config(): config must be")]:
        with pytest.raises(ConfigError, match=r"^" + __import__("re").escape(said)):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()
    by_list = segpipe.export(pathlib.Path(run), pathlib.Path(tmp_path / "b"), classes=["person", 3],
                             score_threshold=np.float32(0.5), max_per_image=np.int64(5))
    by_text = segpipe.export(str(run), str(tmp_path / "c"), classes="person,3")
    assert by_list.counts == by_text.counts and by_list.counts.annotations > 0
    assert json.loads((tmp_path / "b" / "export.json").read_text())["asked"]["score_threshold"] == 0.5
    assert segpipe.as_config({"batch_size": np.int64(2)}, categories=None).batch_size == 2


def test_the_api_names_images_as_the_command_line_does():
    paths = ["/data/photos/a/cat.jpg", "/data/photos/b.png", "/elsewhere/c.jpg"]
    assert file_names(paths, "/data/photos") == ["a/cat.jpg", "b.png", "elsewhere/c.jpg"]
    assert file_names(paths, "/data/photos/") == ["a/cat.jpg", "b.png", "elsewhere/c.jpg"]
    assert file_names(["bucket/x/y.jpg"], "s3://bucket/x?endpoint_override=h") == ["y.jpg"]
    assert file_names(["/abs/new\nline.jpg"]) == ["abs/new%0Aline.jpg"]   # safe, as every name
    assert image_id_for(file_names(paths, "/data/photos")[0]) == image_id_for("a/cat.jpg")


def test_the_api_and_the_listing_agree_on_every_name(tmp_path):
    from PIL import Image

    from segpipe.io.sources import list_images

    entries = ["50%.jpg", "a b#?.jpg", "d\\win.jpg", "a%0Ab.jpg", "tab\there.jpg", "%2E%2E.jpg"]
    for entry in entries:
        Image.new("RGB", (4, 4)).save(tmp_path / entry)
    listed = list_images(str(tmp_path)).column("file_name").to_pylist()
    assert sorted(file_names([str(tmp_path / e) for e in entries], str(tmp_path))) == listed
    assert "50%.jpg" in listed and "a b#?.jpg" in listed   # the files' own names


def test_an_unknown_key_gets_a_did_you_mean_and_no_testing_keys(tmp_path):
    import segpipe

    with pytest.raises(ConfigError) as refused:
        segpipe.as_config({"score_treshold": 0.3})
    assert "did you mean score_threshold?" in str(refused.value)
    assert "fault_kill_after_batches" not in str(refused.value)
    (tmp_path / "c.yaml").write_text("batchsize: 2\n")
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        load_config(tmp_path / "c.yaml")


def test_a_finished_resume_says_there_was_nothing_left_not_none():
    report = RunReport(config=SegmentConfig(input="in", output="out"), weights={}, cluster={},
                       counts=ExportCounts(), accounting=Accounting(4, 4), errors=[],
                       timings={"total": 1.5}, processed=0, resumed_from=4)
    line = report.speed_line()
    assert "None" not in line and "all 4 images were in predictions/ already" in line
    done = replace(report, processed=4, resumed_from=0, timings={"pipeline": 2.0, "total": 4.0})
    assert "4 images segmented at 2.0 images/s in the pipeline, 1.0 images/s overall" in done.speed_line()


@pytest.fixture()
def random_run(tmp_path):
    write_predictions(tmp_path / "run", blob_rows(3, 4, 96, 128, smallest=16, largest=40),
                      settings=replace(SETTINGS, random_weights=True))
    return tmp_path / "run"


def test_random_weights_are_said_wherever_detections_are_shown(random_run, tmp_path, capsys):
    from label_studio_sdk.label_interface import LabelInterface

    assert cli.main(["export", str(random_run), "--to", str(tmp_path / "coco")]) == 0
    assert "WARNING: RANDOM WEIGHTS" in capsys.readouterr().out
    info = json.loads((tmp_path / "coco" / "instances.json").read_text())["info"]
    assert info["random_weights"] is True and info["description"].startswith("RANDOM WEIGHTS")
    run_export(str(random_run), str(tmp_path / "ls"), ExportOptions(0.3),
               export_format=ExportFormat("label-studio", "/x/"))
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    assert "RANDOM WEIGHTS" in config and LabelInterface(config).validate() is not False
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert all(t["predictions"][0]["model_version"].endswith("RANDOM WEIGHTS") for t in tasks)
    run_export(str(random_run), str(tmp_path / "yolo"), ExportOptions(0.3), export_format=ExportFormat("yolo"))
    text = (tmp_path / "yolo" / "data.yaml").read_text()
    assert text.startswith("# RANDOM WEIGHTS") and yaml.safe_load(text)["names"]
    assert cli.main(["review", str(random_run), "--to", str(tmp_path / "review")]) == 0
    out = capsys.readouterr().out
    assert "WARNING: RANDOM WEIGHTS" in out
    assert "(closeness of a score to the threshold (1 at it, 0 at the margin))" in out
    assert " of 3 images; per image mean " in out
    page = gallery_html([{"file_name": "a.jpg", "rendered_name": "a.jpg", "detections_json":
                          json.dumps([{"category_name": "zebra", "score": 0.9}] * 46)}], {}, "t",
                        note="RANDOM WEIGHTS: meaningless")
    assert "RANDOM WEIGHTS: meaningless" in page
    assert "46 detections drawn" in page and ">full size</a>" in page
    assert "detection score</text>" in page and ">detections</text>" in page   # axes named
    assert "break-all" not in page   # captions break between words, not inside them


def test_labels_on_a_large_image_are_drawn_large_enough_for_its_thumbnail():
    import numpy as np

    big = draw_detections(np.zeros((1200, 1600, 3), np.uint8), [
        {"category_name": "zebra", "score": 0.9, "bbox": [100, 400, 300, 300], "segmentation": None}])
    pixels = np.asarray(big)
    label_rows = np.flatnonzero(pixels[:400, 100:500].any(axis=(1, 2)))
    # the label's band above the box, scaled to a 320-px thumbnail, is ~11 px or more
    assert (label_rows.max() - label_rows.min() + 1) * 320 / 1600 >= 10

"""Where segpipe writes: never over or through what it did not make, never into a run's own
folders or its images' folder, one writer at a time, and no killed run leaves an older run's
outputs looking finished. (Hostile world, round three, part 1.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segpipe import cli
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import ExportFormat, run_export
from segpipe.config import ConfigError
from segpipe.io import lease, ownership
from synthetic import SETTINGS, blob_rows, write_predictions


@pytest.fixture()
def run(tmp_path) -> Path:
    write_predictions(tmp_path / "run", blob_rows(6, 8, 96, 128, smallest=16, largest=40))
    return tmp_path / "run"


def exit_and_one_line(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return code, err


def test_an_edited_or_replaced_label_file_is_left_alone_and_counted(run, tmp_path):
    to = tmp_path / "yolo"
    first = run_export(str(run), str(to), ExportOptions(0.3), export_format=ExportFormat("yolo"))
    labels = sorted((to / "labels").rglob("*.txt"))
    assert first["left_alone"] == 0 and len(labels) == 6
    replaced, edited, untouched = labels[0], labels[1], labels[2]
    replaced.unlink()
    replaced.write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")          # the user's own file
    edited.write_text(edited.read_text() + "0 0.5 0.5 0.6 0.5 0.6 0.6\n")
    before = untouched.stat().st_mtime_ns
    again = run_export(str(run), str(to), ExportOptions(0.6), export_format=ExportFormat("yolo"))
    assert again["left_alone"] == 2
    assert replaced.read_text() == "0 0.1 0.1 0.2 0.1 0.2 0.2\n"
    assert edited.read_text().endswith("0 0.5 0.5 0.6 0.5 0.6 0.6\n")
    assert untouched.stat().st_mtime_ns != before                # segpipe's own: rewritten
    # the stamps of the two left alone are not taken over: a third export leaves them too
    third = run_export(str(run), str(to), ExportOptions(0.3), export_format=ExportFormat("yolo"))
    assert third["left_alone"] == 2
    # a stamps table segpipe did not write is refused before any work
    (to / ownership.STAMPS_NAME).write_bytes(b"PAR1 not ours")
    with pytest.raises(ConfigError, match="did not write"):
        run_export(str(run), str(to), ExportOptions(0.3), export_format=ExportFormat("yolo"))


@pytest.mark.parametrize("linked", ["logs", "gallery", "top"])
def test_review_writes_nothing_through_a_link_inside_its_folder(run, tmp_path, capsys, linked):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "mine.jpg").write_bytes(b"my photo")
    to = tmp_path / "review"
    to.mkdir()
    os.symlink(photos, to / linked)
    code, err = exit_and_one_line(capsys, "review", str(run), "--to", str(to), "--top", "2",
                                  "--subset", "coco", "--images", str(photos))
    assert code == 2 and "symbolic link" in err and linked in err
    assert sorted(p.name for p in photos.iterdir()) == ["mine.jpg"]
    assert sorted(p.name for p in to.iterdir()) == [linked]


def test_targets_that_are_the_runs_own_folders_are_refused_before_work(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"input": str(photos)}}))
    own = [run, run / "predictions", run / "coco", run / "logs" / "x"]
    for to in own:
        code, err = exit_and_one_line(capsys, "export", str(run), "--to", str(to))
        assert code == 2 and str(to) in err and ("OUTPUT" in err or "own" in err)
        code, err = exit_and_one_line(capsys, "review", str(run), "--to", str(to))
        assert code == 2 and str(to) in err
    for args in (["--to", str(photos), "--format", "yolo"],        # run.json names it INPUT
                 ["--to", str(photos), "--format", "label-studio", "--image-root", "/p/"],
                 ["--to", str(tmp_path / "lnk"), "--format", "yolo"]):
        os.symlink(photos, tmp_path / "lnk") if not (tmp_path / "lnk").exists() else None
        code, err = exit_and_one_line(capsys, "export", str(run), *args)
        assert code == 2 and "folder of the images" in err
    # nothing was written: every command still takes the run and the images
    assert sorted(p.name for p in photos.iterdir()) == []
    assert not ownership.is_output_folder(*__import__("segpipe.io.storage", fromlist=["x"]).resolve(str(photos)))
    assert sorted(p.name for p in (run / "predictions").iterdir()) == sorted(
        p.name for p in (run / "predictions").iterdir() if p.name.startswith("part-"))
    assert exit_and_one_line(capsys, "export", str(run), "--to", str(tmp_path / "fine"))[0] == 0


def test_segment_into_its_own_input_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    code, err = exit_and_one_line(capsys, "segment", str(tmp_path / "in"), str(tmp_path / "in"),
                                  "--weights", "random")
    assert code == 2 and "folder of the images" in err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.jpg"]


def test_a_new_run_takes_down_the_old_runs_finished_marks_first(run, tmp_path):
    """What a SIGKILL of ``--overwrite`` while predicting left: the old run's coco/ (with the
    index.json that marks a finished write) and run.json beside an emptied predictions/."""
    from segpipe.commands.segment import clear_output, plan_output
    from segpipe.config import SegmentConfig

    from segpipe.coco.writer import export_coco

    export_coco(str(run / "predictions"), str(run / "coco"), ExportOptions(0.5), SETTINGS)
    assert (run / "coco" / "index.json").exists()
    ownership.mark_folder(str(run), "segment")
    ownership.write_json(str(run), "run.json", {"finished": True})
    (run / "coco" / "notes.txt").write_text("mine")          # not segpipe's: stays
    config = SegmentConfig(input=str(tmp_path), output=str(run), overwrite=True)
    clear_output(config, plan_output(config, SETTINGS))
    assert not (run / "run.json").exists()
    assert sorted(p.name for p in (run / "coco").iterdir()) == [".segpipe-files.json", "notes.txt"]
    assert not list((run / "predictions").glob("part-*"))


def test_two_exports_into_one_folder_take_turns(run, tmp_path, capsys):
    to = tmp_path / "coco"
    to.mkdir()
    held = lease.acquire(str(to), what="--to")   # another export, live
    try:
        code, err = exit_and_one_line(capsys, "export", str(run), "--to", str(to))
        assert code == 2 and "in use by another segpipe command" in err
        with pytest.raises(lease.LeaseHeld):
            run_export(str(run), str(to), ExportOptions(0.5))
    finally:
        held.release()
    assert exit_and_one_line(capsys, "export", str(run), "--to", str(to))[0] == 0
    assert not (to / lease.LEASE_NAME).exists()

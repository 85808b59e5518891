"""segpipe removes or replaces only what it can prove it wrote, and never through a link."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from images import write_photos
from PIL import Image
from synthetic import SETTINGS, box_detection, image_row, write_predictions

from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import check_export_target, run_export
from segpipe.commands.render import RenderRequest, _draw, check_render
from segpipe.commands.segment import clear_output, plan_output
from segpipe.config import ConfigError
from segpipe.io import formats, ownership, sources, storage
from segpipe.output.run_folder import check_output, predictions_dir


def plan_then_clear(config, settings) -> None:
    """What a run does to OUTPUT before it segments: plan (and check), then clear."""
    clear_output(config, plan_output(config, settings))


def a_run(output: Path) -> Path:
    """A segpipe OUTPUT with two prediction files (real sink, no Ray)."""
    rows = [image_row(f"img{i}.jpg", 64, 48, [box_detection(1, 0.9, 4, 4, 10, 10, 48, 64)])
            for i in range(2)]
    write_predictions(output, rows, rows_per_file=1)
    ownership.mark_folder(str(output), "segment")
    return output


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_fresh_run_refuses_files_it_did_not_write_and_keeps_them(tmp_path):
    out = tmp_path / "out"
    (out / "predictions" / "old_tool").mkdir(parents=True)
    (out / "predictions" / "old_tool" / "results.csv").write_text("id,label\n1,cat\n")
    (out / "predictions" / "notes.txt").write_text("mine")
    # segpipe's name without segpipe's metadata is not enough
    (out / "predictions" / f"part-{'a' * 32}.parquet").write_bytes(b"PAR1 not really")
    before = tree(out)
    for overwrite in (False, True):
        config = small_config(tmp_path, out, "random", overwrite=overwrite)
        with pytest.raises(ConfigError) as refused:
            plan_then_clear(config, SETTINGS)
        message = str(refused.value)
        assert "3 file(s) segpipe did not write" in message
        assert "old_tool/results.csv" in message and "notes.txt" in message
        assert tree(out) == before


def test_overwrite_removes_only_its_own_files(tmp_path):
    out = a_run(tmp_path / "out")
    directory = predictions_dir(str(out))
    own = sorted(os.listdir(directory))
    assert len(own) == 2
    # a killed writer's temporary file: segpipe's name and Parquet's first bytes
    (Path(directory) / f".{own[0]}.1-abcdef-{'0' * 12}.tmp").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="--overwrite to replace it"):
        check_output(str(out))
    plan_then_clear(small_config(tmp_path, out, "random", overwrite=True), SETTINGS)
    assert os.listdir(directory) == [ownership.LEDGER_NAME]    # what it commits: none yet
    assert ownership.recorded(directory) == {}


def test_links_are_never_followed_out_of_output(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    a_run(tmp_path / "model")   # prediction files segpipe wrote, reached through a link
    for name in os.listdir(tmp_path / "model" / "predictions"):
        os.link(tmp_path / "model" / "predictions" / name, elsewhere / name)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "predictions")
    before = tree(elsewhere)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match="symbolic link"):
            plan_then_clear(small_config(tmp_path, out, "random", **flags), SETTINGS)
    assert tree(elsewhere) == before
    os.unlink(out / "predictions")
    (out / "coco").mkdir()
    os.symlink(elsewhere / "precious.txt", out / "coco" / "instances.json")
    with pytest.raises(ConfigError, match="instances.json is a symbolic link"):
        check_output(str(out), overwrite=True)
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_export_replaces_its_own_files_only(tmp_path):
    run = a_run(tmp_path / "run")
    to = tmp_path / "to"
    to.mkdir()
    (to / "instances.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match=r"1 file\(s\) segpipe did not write.*instances.json"):
        check_export_target(str(to))
    assert (to / "instances.json").read_text() == '{"mine": true}'
    (to / "instances.json").unlink()
    run_export(str(run), str(to), ExportOptions(score_threshold=0.5))
    check_export_target(str(to))                         # its own files: replaced freely
    run_export(str(run), str(to), ExportOptions(score_threshold=0.6))
    assert json.loads((to / "export.json").read_text())["asked"]["score_threshold"] == 0.6
    (to / "results.json").write_text("[]")                # changed behind segpipe's back
    with pytest.raises(ConfigError, match="results.json"):
        run_export(str(run), str(to), ExportOptions(score_threshold=0.5))
    assert (to / "results.json").read_text() == "[]"


def test_a_killed_exports_temporary_files_are_removed_by_the_next(tmp_path):
    run = a_run(tmp_path / "run")
    to = tmp_path / "to"
    to.mkdir()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    gone = int(child.stdout)   # a pid that has exited
    dead = to / f".instances.json.{gone}-{storage.host_tag()}-{'1' * 12}.tmp"
    dead.write_bytes(b'{"info":')
    live = to / f".results.json.{os.getpid()}-{storage.host_tag()}-{'2' * 12}.tmp"
    live.write_bytes(b"[")
    old = to / f".results.json.{'3' * 12}.tmp"            # no writer named, untouched for long
    old.write_bytes(b"[")
    long_ago = time.time() - 2 * ownership.STALE_TEMPORARY_S
    os.utime(old, (long_ago, long_ago))
    foreign = to / f".results.json.{gone}-{storage.host_tag()}-{'4' * 12}.tmp.keep"
    foreign.write_bytes(b"[")
    run_export(str(run), str(to), ExportOptions(score_threshold=0.5))
    assert not dead.exists() and not old.exists()
    assert live.exists() and foreign.exists()


def test_render_draws_over_its_own_images_only(tmp_path):
    run = a_run(tmp_path / "run")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(photos / f"img{i}.jpg")
    to = tmp_path / "gallery"
    (to / "images").mkdir(parents=True)
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(to / "images" / "img0.jpg")
    request = RenderRequest(str(run), str(photos), str(to))
    with pytest.raises(ConfigError, match=r"did not write.*img0.jpg"):
        check_render(request)
    # an image render drew carries render's comment: drawing over it again is allowed
    checked = check_render(replace(request, limit=1, to=str(tmp_path / "g2")))
    row = checked.rows.to_pylist()[0]
    assert _draw(row, (photos / "img0.jpg").read_bytes(), *storage.resolve(str(to))) is None
    with Image.open(to / "images" / "img0.jpg") as drawn:
        assert drawn.info["comment"] == ownership.RENDER_COMMENT
    check_render(request)


def test_output_folders_are_known_by_segpipes_ledger_not_by_file_names(tmp_path):
    root = tmp_path / "in"
    write_photos(root / "dataset", names=("chelsea",))
    (root / "dataset" / "run.json").write_text('{"tool": "another"}')   # another tool's
    (root / "dataset" / "export.json").write_text("{}")
    ownership.mark_folder(str(root / "seg-out"), "render")
    write_photos(root / "seg-out" / "images", names=("coffee",))     # what render drew there
    write_photos(root / "fake", names=("rocket",))
    (root / "fake" / ownership.LEDGER_NAME).write_text("[]")          # not segpipe's ledger
    found = formats.list_inputs(str(root), "auto")
    assert found.listing.column("file_name").to_pylist() == \
        ["dataset/chelsea.png", "fake/rocket.png"]
    assert found.skipped[sources.SKIPPED_OUTPUT_FOLDERS] == ["seg-out"]


def test_a_to_folder_above_the_users_images_leaves_them_input(tmp_path):
    """``export/render --to`` a folder that holds the user's images (INPUT's parent): a later
    ``segment`` of that folder leaves out what segpipe wrote there and keeps the rest."""
    root = tmp_path / "photos"
    write_photos(root / "holiday", names=("chelsea",))
    write_photos(root, names=("astronaut",))
    ownership.mark_folder(str(root), "render")                       # render --to photos
    write_photos(root / "images", names=("coffee",))                 # what it drew there
    write_photos(root, names=("rocket",))                            # the user's, added later
    ownership.record_written(str(root), ["rocket.png"])              # ... or segpipe's
    assert ownership.found_before(*storage.resolve(str(root))) == \
        {"holiday", "astronaut.png"}
    found = formats.list_inputs(str(root), "auto")
    assert found.listing.column("file_name").to_pylist() == ["astronaut.png", "holiday/chelsea.png"]
    assert found.skipped[sources.SKIPPED_OUTPUT_FOLDERS] == ["images", "rocket.png"]
    # a folder segpipe made holds nothing of the user's: all of it is left out
    ownership.mark_folder(str(tmp_path / "made"), "export")
    write_photos(tmp_path / "made", names=("coffee",))
    assert ownership.found_before(*storage.resolve(str(tmp_path / "made"))) == frozenset()
    assert formats.list_inputs(str(tmp_path), "auto").skipped[sources.SKIPPED_OUTPUT_FOLDERS] \
        == ["made", "photos/images", "photos/rocket.png"]


def test_a_foreign_ledger_is_not_overwritten(tmp_path):
    (tmp_path / ownership.LEDGER_NAME).write_text("my own notes")
    with pytest.raises(ConfigError, match="not segpipe's ledger"):
        ownership.record_written(str(tmp_path), ["x"])
    assert (tmp_path / ownership.LEDGER_NAME).read_text() == "my own notes"


def a_finished_run(output: Path) -> list[Path]:
    a_run(output)
    directory = predictions_dir(str(output))
    names = sorted(os.listdir(directory))
    ownership.record_written(directory, names, whole=True)   # as a finished run records them
    return [Path(directory) / n for n in names]

@pytest.mark.parametrize("change,expected", [
    ("backup", "1 not segpipe's ("),
    ("subfolder", "1 not segpipe's ("),
    ("renamed copy", "1 not recorded by the finished run"),
    ("deleted", "1 missing ("),
    ("truncated", "1 damaged ("),
])
def test_readers_name_what_changed_behind_segpipes_back(tmp_path, change, expected):
    out = tmp_path / "out"
    first, second = a_finished_run(out)
    if change == "backup":
        (first.parent / (first.name + ".bak")).write_bytes(first.read_bytes())
    elif change == "subfolder":
        (first.parent / "old").mkdir()
        (first.parent / "old" / first.name).write_bytes(first.read_bytes())
    elif change == "renamed copy":
        (first.parent / f"part-{'f' * 32}.parquet").write_bytes(first.read_bytes())
    elif change == "deleted":
        first.unlink()
    else:
        first.write_bytes(first.read_bytes()[:100])
    to = tmp_path / "to"
    with pytest.raises(ConfigError) as refused:
        run_export(str(out), str(to), ExportOptions(score_threshold=0.5))
    message = str(refused.value)
    assert expected in message and "\n" not in message, message
    if change == "renamed copy":
        assert "2 with images also in another file" in message
    assert not to.exists()                   # nothing written
    if change in ("truncated", "subfolder", "backup"):   # a resume is refused the same way
        with pytest.raises(ConfigError, match=expected.split(" (")[0]):
            plan_then_clear(small_config(tmp_path, out, "random", resume=True), SETTINGS)


def test_a_resume_with_another_input_is_refused_before_work(tmp_path):
    """Resuming a run with another folder as INPUT segmented all of it into the run, then
    failed the accounting ("8 unexpected rows"): the images done must be under INPUT."""
    from segpipe.commands.segment import check_resumed_input

    write_photos(tmp_path / "in", names=("chelsea", "coffee"))
    listing = sources.list_images(str(tmp_path / "in"))
    config = small_config(tmp_path / "in", tmp_path / "out", "random", resume=True)
    done = set(listing.column("image_id").to_pylist())
    check_resumed_input(config, listing, done)                          # the same INPUT
    check_resumed_input(config, listing, set(list(done)[:1]))           # part of it done
    check_resumed_input(config, None, {1, 2})                           # shards: not known yet
    with pytest.raises(ConfigError, match=r"1 of the 3 images in its predictions/ are not under INPUT"):
        check_resumed_input(config, listing, done | {sources.image_id_for("elsewhere.jpg")})


def test_a_temporary_its_writer_moves_while_it_is_looked_at_is_not_stale(tmp_path, monkeypatch):
    """A writer that renames its temporary into place between the listing and the look at
    the file: no error, and nothing to remove (the file is no longer a temporary)."""
    from segpipe.io import ownership

    stale = tmp_path / ".instances.json.0123456789ab.tmp"   # no writer named: by its age
    stale.write_text("{}")
    os.utime(stale, (0, 0))
    assert ownership.stale_temporaries(str(tmp_path), ["instances.json"]) == [str(stale)]

    def moved_while_checked(*args):
        if stale.exists():
            stale.rename(tmp_path / "instances.json")
        return True

    monkeypatch.setattr(ownership, "_writer_gone", moved_while_checked)
    assert ownership.stale_temporaries(str(tmp_path), ["instances.json"]) == []
    assert (tmp_path / "instances.json").read_text() == "{}"

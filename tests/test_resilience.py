"""Never lose or duplicate an image: Ctrl-C, SIGKILL then --resume, a predictor actor dying, OOM."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from conftest import small_config, small_spec
from images import write_photos
from segpipe.model import rcnn as family_module
from segpipe import schema
from segpipe.model.resolved import resolve_weights
from segpipe.commands.segment import run_segment
from segpipe.config import ConfigError
from segpipe.model.stage import PredictStage
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import run_export
from segpipe.output.run_folder import prediction_files
from segpipe.output.sinks import write_prediction_file
from segpipe.io.sources import list_images
from segpipe.model.settings import RunSettings
from test_cli import small_flags

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


def written_ids(out: Path) -> Counter:
    return Counter(i for p in prediction_files(str(out / "predictions"))
                   for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())


def settled_files(out: Path, quiet: float = 5.0) -> list[str]:
    """The prediction files once none has appeared for ``quiet`` seconds.

    Ray's workers do not all live in the killed process group: a write task in flight when
    its node died can still rename its finished file into place a moment later.
    """
    files, since = prediction_files(str(out / "predictions")), time.time()
    while time.time() - since < quiet:
        time.sleep(0.2)
        now = prediction_files(str(out / "predictions"))
        if now != files:
            files, since = now, time.time()
    return files


def many_photos(folder: Path, copies: int) -> None:
    write_photos(folder)
    for k in range(1, copies):
        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            (folder / f"{name}_{k}.png").write_bytes((folder / f"{name}.png").read_bytes())


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:   # gone, or a zombie
        return ""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _until_a_new_file(out: Path, process: subprocess.Popen,
                      old: frozenset[str] | set[str] = frozenset()) -> None:
    """Wait until ``out/predictions`` holds a prediction file not in ``old``."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and \
            not set(prediction_files(str(out / "predictions"))) - old:
        time.sleep(0.05)
    assert process.poll() is None, "the signal should land mid-run"


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_then_sigkill_then_resume_gives_every_image_exactly_once(tmp_path, checkpoint,
                                                                       local_ray):
    """Ctrl-C says what was kept and how to finish; that command, its driver SIGKILLed after a
    file of its own, leaves no process behind and loses nothing; a resume with other settings
    is refused; the last resume redoes nothing, writes every image once and coco/ as the
    predictions give it."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    many_photos(inputs, copies=6)
    listed = set(list_images(str(inputs)).column("image_id").to_pylist())
    args = ["segment", str(inputs), str(out), "--weights", str(checkpoint), *small_flags(),
            "--batch-size", "1", "--rows-per-file", "2", "--coco-shard-images", "6"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}

    process = subprocess.Popen([SEGPIPE, *args], env=env, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _until_a_new_file(out, process)
    process.send_signal(signal.SIGINT)   # what Ctrl-C sends to the driver
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    assert "complete prediction file(s) are kept" in stderr
    resume_line = stderr.split("Finish the run with:\n", 1)[1].splitlines()[0].strip()
    assert resume_line.endswith("--resume") and str(out) in resume_line
    interrupted = set(prediction_files(str(out / "predictions")))

    # The command it printed, its driver alone SIGKILLed once it has written a file of its own:
    # no process of its local Ray outlives it (Ray's DashboardAgent and RuntimeEnvAgent did,
    # deaf to SIGTERM), and the files it finished stay.
    process = subprocess.Popen(shlex.split(resume_line), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _until_a_new_file(out, process, interrupted)
    ray_processes = [p for p in psutil.Process(process.pid).children(recursive=True)
                     if "segpipe.cluster.reaper" not in _command(p)]
    predictors = [p for p in ray_processes if "PredictStage" in _command(p)]
    # its workers run at the command's priority, not at Ray's niceness 15
    assert predictors and {p.nice() for p in predictors} == {os.nice(0)}
    process.kill()
    process.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in ray_processes):
        time.sleep(0.5)
    assert not [p for p in ray_processes if _alive(p)], \
        [_command(p) for p in ray_processes if _alive(p)]
    kept = {path: Path(path).read_bytes() for path in settled_files(out)}
    before = written_ids(out)
    assert set(kept) > interrupted and sum(before.values()) < len(listed), \
        "the kill should land mid-run"
    assert max(before.values()) == 1

    # The last resume runs in this process, on the worker's Ray: its result is what is tested
    # here (the command's own lines and exit codes are, above), and a command's start costs
    # about 30 s of CPU on 2 cores.
    resume = small_config(inputs, out, checkpoint, batch_size=1, rows_per_file=2,
                          coco_shard_images=6, resume=True)
    with pytest.raises(ConfigError, match="mask_threshold: 0.5 then, 0.4 now"):
        run_segment(dataclasses.replace(resume, mask_threshold=0.4))
    run_segment(resume)
    after = written_ids(out)
    assert set(after) == listed and max(after.values()) == 1
    # The earlier files are still there, unchanged: resume kept them and redid nothing.
    assert all(Path(path).read_bytes() == data for path, data in kept.items())
    new_files = set(prediction_files(str(out / "predictions"))) - set(kept)
    new_ids = Counter(i for p in new_files
                      for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
    assert set(new_ids) == listed - set(before) and max(new_ids.values()) == 1
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["resumed_from"] == sum(before.values())
    assert manifest["processed"] == sum(new_ids.values())
    assert manifest["accounting"]["complete"] and manifest["counts"]["images"] == len(listed)
    assert not [p for p in (out / "predictions").iterdir() if p.name.endswith(".tmp")]

    # coco/, written in Ray tasks at the end of the resumed run, is byte for byte what the same
    # predictions give written as one file in another order and exported in this process
    rows = pa.concat_tables([pq.read_table(p) for p in prediction_files(str(out / "predictions"))])
    again = tmp_path / "again"
    write_prediction_file(rows.take(np.arange(rows.num_rows)[::-1]),
                          str(again / "predictions"),
                          RunSettings.from_metadata(pq.read_schema(
                              prediction_files(str(out / "predictions"))[0]).metadata))
    options = ExportOptions(score_threshold=0.5)
    run_export(str(again), str(tmp_path / "coco"), options, shard_images=6)
    index = json.loads((out / "coco" / "index.json").read_text())
    assert [s["images"] for s in index["shards"]] == [6] * (len(listed) // 6) + \
        ([len(listed) % 6] if len(listed) % 6 else [])
    for name in ["index.json"] + [n for s in index["shards"] for n in (s["instances"], s["results"])]:
        assert (out / "coco" / name).read_bytes() == (tmp_path / "coco" / name).read_bytes(), name


@pytest.mark.slow
def test_a_predictor_actor_killed_mid_batch_loses_nothing(tmp_path, checkpoint, local_ray):
    inputs = tmp_path / "in"
    many_photos(inputs, copies=2)
    config = small_config(inputs, tmp_path / "out", checkpoint, batch_size=1,
                          fault_kill_after_batches=2)
    report = run_segment(config)
    assert (tmp_path / "out" / ".fault-injected").read_text().startswith("killed pid")
    ids = written_ids(tmp_path / "out")
    assert len(ids) == 8 and max(ids.values()) == 1
    assert report.accounting.complete and report.counts.ok == 8


class _OutOfMemory:
    """Stands in for predict_images: CUDA OOM for batches over one image, or for a poison image."""

    def __init__(self, real, poison_width):
        self.real, self.poison_width, self.calls = real, poison_width, []

    def __call__(self, model, images, *args):
        self.calls.append(len(images))
        if len(images) > 1 or images[0].shape[-1] == self.poison_width:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(model, images, *args)


def test_out_of_memory_splits_the_batch_down_to_single_images(monkeypatch):
    spec = small_spec()
    actor = PredictStage(spec, resolve_weights("random", spec).payload, use_gpu=False)
    sizes = [(40, 60), (40, 60), (40, 61), (40, 60)]
    rows = [{"image_id": i, "file_name": f"{i}.png", "width": w, "height": h, "status": "ok",
             "error": None, schema.PIXELS: np.full((h, w, 3), 100, np.uint8).tobytes()}
            for i, (h, w) in enumerate(sizes)]
    rows.append({"image_id": 9, "file_name": "bad.png", "width": None, "height": None,
                 "status": "error", "error": "decode: empty file (0 bytes)", schema.PIXELS: b""})
    fake = _OutOfMemory(family_module.predict_images, poison_width=61)
    monkeypatch.setattr(family_module, "predict_images", fake)
    out = actor(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "error", "ok", "error"]
    assert out[2]["error"].startswith("predict: OutOfMemoryError: CUDA out of memory")
    assert out[4]["error"] == "decode: empty file (0 bytes)"
    assert fake.calls[0] == 4 and fake.calls.count(1) == 4


class Killed(Exception):
    """A command stopped on the way, as a SIGKILL would stop it."""


def _killed(*args, **kwargs):
    raise Killed


def _earlier(folder: Path, kind: str, names: list[str]) -> None:
    """What a finished earlier command of ``kind`` left in ``folder``, proven segpipe's."""
    from segpipe.io import ownership

    ownership.mark_folder(str(folder), kind)
    for name in names:
        (folder / name).write_text("{}")
    ownership.record_written(str(folder), names)


def test_a_command_stopped_on_the_way_leaves_no_earlier_result_looking_whole(tmp_path, monkeypatch):
    """A SIGKILLed re-export left the earlier export's export.json (and YOLO's data.yaml, Label
    Studio's tasks) beside half-rewritten files; render and review likewise their index.html
    and review.json. Each command retires its records first and writes them last."""
    from segpipe.coco import writer as coco_writer
    from segpipe.commands.export import ExportFormat
    from segpipe.commands.render import RenderRequest, check_render, run_render
    from segpipe.commands.review import ReviewRequest, run_review
    from segpipe.labels import label_studio, yolo
    from segpipe.review import queue
    from segpipe.cluster import session
    from test_untrusted_runs import run_with

    run = run_with(tmp_path)
    stages = {"coco": (coco_writer, "write_shard_entries", ["index.json"]),
              "yolo": (yolo, "write_label_part", ["data.yaml"]),
              "label-studio": (label_studio, "write_task_file", ["tasks.json", "label_config.xml"])}
    for name, (module, stage, records) in stages.items():
        to, request = tmp_path / name, ExportFormat(name, "/x/" if name == "label-studio" else None)
        run_export(str(run), str(to), ExportOptions(0.5), export_format=request)
        assert all((to / f).exists() for f in ["export.json", *records])
        with monkeypatch.context() as patch:
            patch.setattr(module, stage, _killed)
            with pytest.raises(Killed):
                run_export(str(run), str(to), ExportOptions(0.7), export_format=request)
        assert not [f for f in ["export.json", *records] if (to / f).exists()], name

    images = tmp_path / "images"
    write_photos(images, names=("chelsea",))
    gallery = tmp_path / "gallery"
    _earlier(gallery, "render", ["index.html", "render.json"])
    monkeypatch.setattr(session, "ray_session", _killed)
    render = RenderRequest(str(run), str(images), str(gallery))
    with pytest.raises(Killed):
        run_render(render, check_render(render))
    assert not (gallery / "index.html").exists() and not (gallery / "render.json").exists()

    review = tmp_path / "review"
    _earlier(review, "review", ["review.json"])
    (review / "gallery").mkdir()
    _earlier(review / "gallery", "render", ["index.html", "render.json"])
    (review / "top").mkdir()
    _earlier(review / "top", "export", ["export.json"])
    monkeypatch.setattr(queue, "score_images", _killed)
    with pytest.raises(Killed):
        run_review(ReviewRequest(str(run), str(review)))
    assert not [p for p in ("review.json", "gallery/index.html", "gallery/render.json",
                            "top/export.json") if (review / p).exists()]


def test_an_overwrite_stopped_once_it_starts_leaves_no_earlier_run_looking_finished(
        tmp_path, checkpoint, local_ray, monkeypatch):
    """An ``--overwrite`` killed while it predicts left predictions/ empty beside the earlier
    run's coco/ (with its index.json) and run.json. The earlier run's records go before any
    image is predicted; stopped right then, nothing looks finished."""
    from segpipe.coco.writer import export_coco
    from segpipe.commands import segment
    from segpipe.io import ownership
    from synthetic import SETTINGS, blob_rows, write_predictions

    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs)
    write_predictions(out, blob_rows(3, 4, 96, 128, smallest=16, largest=40))   # an earlier run
    export_coco(str(out / "predictions"), str(out / "coco"), ExportOptions(0.5), SETTINGS)
    ownership.mark_folder(str(out), "segment")
    ownership.write_json(str(out), "run.json", {"finished": True})
    assert (out / "coco" / "index.json").exists()
    clear_output = segment.clear_output

    def cleared_then_killed(*args, **kwargs):
        clear_output(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(segment, "clear_output", cleared_then_killed)
    with pytest.raises(Killed):
        run_segment(small_config(inputs, out, checkpoint, overwrite=True))
    assert not (out / "run.json").exists() and not (out / "coco" / "index.json").exists()
    assert not list((out / "coco").glob("instances*.json"))

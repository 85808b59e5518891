"""The first hour of a new user: mistakes caught at once, help that is a manual, progress, quiet."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from images import write_photos
from segpipe.progress import Progress
from synthetic import image_row, write_predictions
from test_cli import SEGPIPE, run_cli


@pytest.fixture(scope="module")
def no_torch_no_ray(tmp_path_factory) -> dict:
    """An environment where importing torch or ray fails: what runs there needs neither."""
    fake = tmp_path_factory.mktemp("blocked")
    for name in ("torch", "torchvision", "ray"):
        (fake / name).mkdir()
        (fake / name / "__init__.py").write_text(
            f"raise ImportError('{name} was imported before the checks finished')\n")
    return {"PYTHONPATH": str(fake)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("first-hour") / "in"
    write_photos(folder, names=("chelsea",))
    return folder


@pytest.mark.parametrize("case", ["value", "input", "output_file", "weights", "categories",
                                  "output_unwritable", "earlier_run", "config_key"])
def test_mistakes_fail_before_torch_or_ray_with_one_line(case, photos, tmp_path, no_torch_no_ray):
    out = tmp_path / "out"
    args = [str(photos), str(out), "--weights", "random"]
    expected = {
        "value": "score_threshold must be in [0, 1), got 2.0",
        "input": "INPUT", "output_file": "is a file", "weights": "weights file",
        "categories": "categories file", "output_unwritable": "cannot be",
        "earlier_run": "--resume to finish it", "config_key": "unknown key(s) score_treshold",
    }[case]
    if case == "value":
        args += ["--score-threshold", "2"]
    elif case == "input":
        args[0] = str(photos) + "-typo"
    elif case == "output_file":
        out.write_text("I am a file")
    elif case == "weights":
        args[3] = str(tmp_path / "model_final.pth")
    elif case == "categories":
        args += ["--categories", str(tmp_path / "classes.txt")]
    elif case == "output_unwritable":
        (tmp_path / "file").write_text("x")
        args[1] = str(tmp_path / "file" / "out")
    elif case == "earlier_run":
        write_predictions(out, [image_row("chelsea.png", 64, 64, [])])   # a real earlier run
    elif case == "config_key":
        (tmp_path / "c.yaml").write_text("score_treshold: 0.7\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    result = run_cli("segment", *args, env_extra=no_torch_no_ray)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segpipe: configuration error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and "RANDOM WEIGHTS" not in result.stderr
    if case not in ("output_file", "earlier_run"):
        assert not out.exists()


def test_render_and_export_check_their_paths_before_ray(tmp_path, no_torch_no_ray):
    render = run_cli("render", str(tmp_path / "no-run"), "--images", str(tmp_path), "--to",
                     str(tmp_path / "g"), env_extra=no_torch_no_ray)
    assert render.returncode == 2 and "holds no prediction files" in render.stderr
    export = run_cli("export", str(tmp_path / "no-run"), "--to", str(tmp_path / "x"),
                     env_extra=no_torch_no_ray)
    assert export.returncode == 2 and "holds no prediction files" in export.stderr


def test_help_is_a_manual(no_torch_no_ray):
    top = run_cli("--help", env_extra=no_torch_no_ray)
    assert top.returncode == 0
    assert "Segment large image datasets" in top.stdout and "Exit status" in top.stdout
    for command in ("segment", "export", "review", "eval", "render", "weights"):
        assert f"    {command}" in top.stdout
    segment = run_cli("segment", "--help", env_extra=no_torch_no_ray).stdout
    assert segment.startswith("usage: segpipe segment INPUT OUTPUT")
    for section in ("model and weights", "what is kept", "inputs", "cluster and sizing"):
        assert f"\n{section}:" in segment
    flat = " ".join(segment.split())
    assert "(default: 0.05)" in flat and "(default: maskrcnn_resnet50_fpn)" in flat
    for command, flags in {"render": ("--score-threshold", "--classes", "--limit"),
                           "eval": ("--iou-type", "--score-threshold"),
                           "export": ("--polygons", "--min-area", "--format", "--image-root"),
                           "review": ("--top", "--subset", "--margin")}.items():
        text = run_cli(command, "--help", env_extra=no_torch_no_ray).stdout
        # Each option's entry: from "  --flag" to the next option.
        entries = {("-" + chunk).split()[0].rstrip(","): chunk
                   for chunk in text.split("\n  -")[1:]}
        for flag in flags:
            assert len(entries[flag].split()) > 5 and "(default" in " ".join(entries[flag].split()), \
                f"{command} {flag} has no help or no default"


@pytest.mark.parametrize("args,hint", [
    (["segmnet", "a", "b"], "did you mean 'segment'?"),
    (["segment", "a", "b", "--score-treshold", "0.5"], "--score-treshold: did you mean --score-threshold?"),
    (["export", "out", "--to", "x", "--polygns"], "did you mean --polygons?"),
    (["segment", "a", "b", "--arch", "maskrcnn_resnet50"], "did you mean maskrcnn_resnet50_fpn?"),
])
def test_misspellings_get_a_did_you_mean(args, hint, no_torch_no_ray):
    result = run_cli(*args, env_extra=no_torch_no_ray)
    assert result.returncode == 2 and hint in result.stderr


def test_weights_command_prints_the_file_folder_and_url(tmp_path, no_torch_no_ray):
    env = {**no_torch_no_ray, "TORCH_HOME": str(tmp_path / "th")}
    result = run_cli("weights", "--arch", "fasterrcnn_resnet50_fpn", env_extra=env)
    assert result.returncode == 1 and "missing" in result.stdout
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth") \
        in result.stdout
    assert "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in result.stdout
    assert "TORCH_HOME=" in result.stdout


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    plain = io.StringIO()
    with Progress("segment", 4, stream=plain, interval=0) as progress:
        for done in range(1, 5):
            progress.update(done, failed=1 if done > 2 else 0)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("segpipe: segment: 1/4 images (25%)")
    assert "4/4 images (100%)" in lines[-1] and "1 failed" in lines[-1]
    assert "\r" not in plain.getvalue()
    terminal = io.StringIO()
    with Progress("segment", 4, stream=terminal, terminal=True) as progress:
        progress.update(3)
    assert "segpipe: segment:" in terminal.getvalue() and "3/4" in terminal.getvalue()
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    with Progress("segment", 4, stream=quiet, interval=0, enabled=False) as progress:
        progress.update(4)
    assert quiet.getvalue() == ""


def test_a_run_that_fails_midway_says_why_in_one_line_and_how_to_finish(photos, tmp_path,
                                                                        monkeypatch, capfd):
    """A full disk (or any fault) after the work began: no traceback on the terminal, the
    cause, the log that holds the traceback, and the command to finish the run, exit 1."""
    from segpipe import cli
    from segpipe.commands import segment as pipeline

    out = tmp_path / "out"

    def prepared(config, checked):
        out.mkdir()
        return config

    def disk_full(config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "prepare_run", prepared)
    monkeypatch.setattr(pipeline, "execute_run", disk_full)
    monkeypatch.setattr(sys, "argv", ["segpipe", "segment", str(photos), str(out)])
    code = cli.main(["segment", str(photos), str(out), "--weights", "random", "--no-progress"])
    err = capfd.readouterr().err
    assert code == 1
    assert "segpipe: the run failed: OSError: [Errno 28] No space left on device" in err
    assert "Traceback" not in err and f"{out} --resume" in err
    log = next((out / "logs").iterdir())
    assert "Traceback" in log.read_text() and str(log) in err


@pytest.mark.ray
def test_a_commands_local_ray_imports_segpipe_anywhere_and_runs_at_its_priority(tmp_path):
    """Started from a folder that holds a clone named segpipe (no __init__.py at its top),
    Ray's workers, which get the driver's folder on their path, still import segpipe. And
    they run at the driver's priority (``nice segpipe ...``), not at Ray's niceness 15,
    where any other busy process on the machine starved them."""
    holder = tmp_path / "holder"
    (holder / "segpipe" / "segpipe").mkdir(parents=True)   # a clone: the package one deeper
    script = ("import os, ray\nfrom segpipe.cluster.session import ray_session\n"
              "os.nice(3)\n"
              "with ray_session(None):\n"
              "    f = ray.remote(lambda: (__import__('segpipe.commands.render').__version__,\n"
              "                            os.nice(0)))\n"
              "    print('version %s nice %d' % ray.get(f.remote()))\n")
    (tmp_path / "driver.py").write_text(script)     # as the segpipe command: not in holder/
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    result = subprocess.run([sys.executable, str(tmp_path / "driver.py")], cwd=holder,
                            capture_output=True, text=True, timeout=300,
                            env={**env, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "version 0." in result.stdout
    assert f"nice {min(os.nice(0) + 3, 19)}" in result.stdout


def test_segpipes_own_ray_keeps_a_worker_niceness_the_user_set(monkeypatch):
    """The local Ray segpipe starts runs its workers at niceness 0 (relative: the starting
    process's own) unless ``RAY_worker_niceness`` says otherwise; a Python user's first run
    joins ``RAY_ADDRESS`` as ``ray.init()`` does, with no system config (Ray refuses one
    for a running cluster)."""
    import ray

    from segpipe.cluster import session

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    first = session.local_ray_system_config()
    assert first == {"worker_niceness": 0}
    first["object_spilling_config"] = "ray.init adds keys"
    assert session.local_ray_system_config() == {"worker_niceness": 0}
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    session.start_or_join_ray()
    monkeypatch.setenv("RAY_worker_niceness", "10")
    assert session.local_ray_system_config() == {}
    session.start_or_join_ray()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    session.start_or_join_ray()
    assert calls == [{"_system_config": {"worker_niceness": 0}}, {"_system_config": {}}, {}]


def test_the_folder_given_to_rays_workers_holds_the_package():
    from segpipe.cluster.session import package_parent

    assert (Path(package_parent()) / "segpipe" / "__init__.py").is_file()


def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(photos, tmp_path):
    """SIGINT while torch is imported or the weights load: no traceback, exit 130."""
    import signal
    import time

    process = subprocess.Popen([SEGPIPE, "segment", str(photos), str(tmp_path / "out"),
                                "--weights", "random", "--no-progress"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:   # torch is being imported:
        if "libtorch" in maps.read_text(errors="replace"):           # the checks are done
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


def test_the_progress_line_says_the_stage_until_the_first_image():
    from segpipe.commands.segment import stage_before_first_image

    stream = io.StringIO()
    progress = Progress("segment", 10, stream=stream, terminal=False)
    progress.set_stage(stage_before_first_image(1, 2))
    assert progress.line().endswith("starting predictor actors and loading the model "
                                    "(1 of 2 ready)")
    progress.set_stage(stage_before_first_image(2, 2))
    assert progress.line().endswith("predicting the first batch")
    progress.update(1)
    assert "first batch" not in progress.line()


def test_a_small_run_starts_no_actor_it_has_no_batch_for():
    from conftest import small_config
    from segpipe.cluster.plan import StagePlan, fit_pool_to_work

    plan = StagePlan(2, 4, 0.0, 0.9, 1, 0.25, 0.2, 0.05, 1)
    config = small_config("in", "out", "random", batch_size=3)
    assert (fit_pool_to_work(plan, 4, config).min_actors,
            fit_pool_to_work(plan, 4, config).max_actors) == (1, 1)
    assert (fit_pool_to_work(plan, 9, config).min_actors,
            fit_pool_to_work(plan, 9, config).max_actors) == (2, 3)
    assert fit_pool_to_work(plan, 1000, config) == plan
    # tar shards, tables, an API dataset: images unknown until read; Ray Data grows the pool
    from segpipe.cluster.plan import fit_pool_to_unknown_work

    assert (fit_pool_to_unknown_work(plan).min_actors, fit_pool_to_unknown_work(plan).max_actors) == (1, 4)


def test_a_ctrl_c_a_library_swallows_is_still_seen():
    """The flag the CLI holds from start-up records Ctrl-C even where a library catches the
    KeyboardInterrupt (an import, Ray starting), so the run stops at its next check."""
    import os
    import signal
    import time
    from types import SimpleNamespace

    from segpipe.commands.segment import _stop_if_interrupted
    from segpipe.console import interrupt_flag

    before = signal.getsignal(signal.SIGINT)
    with interrupt_flag() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass   # what a library that swallows it does
        assert interrupted.is_set()
        with interrupt_flag() as inner:   # the Ray block's own flag, nested
            assert not inner.is_set()
            with pytest.raises(KeyboardInterrupt):
                _stop_if_interrupted(SimpleNamespace(interrupted=interrupted), inner)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_a_run_as_ctrl_c_does():
    """`ray job stop` and a pod being stopped send SIGTERM: it ended the driver where it stood
    (exit -15, no word of what was kept); now it raises KeyboardInterrupt as Ctrl-C does, and
    the handler before is put back."""
    import os
    import signal
    import time

    from segpipe.console import interrupt_flag

    before = signal.getsignal(signal.SIGTERM)
    with interrupt_flag() as interrupted:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert interrupted.is_set()
    assert signal.getsignal(signal.SIGTERM) is before

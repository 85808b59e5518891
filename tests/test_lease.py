"""Concurrent runs: one OUTPUT, one run at a time; a killed run's lease goes stale; a write
that lands after its run lost OUTPUT is dropped, not counted twice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from images import write_photos
from synthetic import SETTINGS, image_row
from segpipe.io import lease as lease_module
from segpipe.output.run_folder import prediction_files
from segpipe.io.lease import LEASE_NAME, LeaseHeld, LeaseLost, acquire, check_free, check_holder
from segpipe import schema
from segpipe.output.sinks import write_prediction_file
from test_cli import small_flags

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


def write_lease(folder: Path, **fields) -> None:
    record = {"run_id": "other", "host": "elsewhere", "pid": 1, "command": "segpipe segment",
              "started": "2026-11-25T00:00:00+00:00", "renewed": time.time(), **fields}
    (folder / LEASE_NAME).write_text(json.dumps(record))


def test_a_live_lease_is_refused_naming_its_holder(tmp_path):
    write_lease(tmp_path, run_id="abc123", host="gpu-node-7", pid=4242)
    with pytest.raises(LeaseHeld) as caught:
        acquire(str(tmp_path))
    message = str(caught.value)
    assert "abc123" in message and "gpu-node-7" in message and "pid 4242" in message
    assert "--resume" in message
    with pytest.raises(LeaseHeld):
        check_free(str(tmp_path))


def test_a_lease_not_renewed_for_long_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    write_lease(tmp_path, renewed=time.time() - lease_module.STALE_AFTER_S - 1)
    check_free(str(tmp_path))
    held = acquire(str(tmp_path))
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == held.run_id
    held.release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_a_lease_whose_process_is_gone_on_this_host_is_stale_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
    write_lease(tmp_path, host=socket.gethostname(), pid=int(finished.stdout))
    held = acquire(str(tmp_path))
    assert held.run_id != "other"
    held.release()


def test_a_write_after_the_lease_moved_on_is_dropped(tmp_path):
    held = acquire(str(tmp_path))
    predictions = tmp_path / "predictions"
    table = pa.Table.from_pylist([image_row("a.jpg", 64, 64, [])],
                                 schema=schema.PREDICTION_SCHEMA)
    fence = lambda: check_holder(str(tmp_path), held.run_id)  # noqa: E731
    write_prediction_file(table, str(predictions), SETTINGS, fence)     # the holder writes
    write_lease(tmp_path, run_id="the-resume")          # a --resume took OUTPUT over
    with pytest.raises(LeaseLost, match="the-resume"):
        write_prediction_file(table, str(predictions), SETTINGS, fence)
    assert len(prediction_files(str(predictions))) == 1
    assert not [p for p in predictions.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.ray
def test_two_runs_started_together_into_one_output(tmp_path, checkpoint):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_photos(inputs)
    args = [SEGPIPE, "segment", str(inputs), str(out), "--weights", str(checkpoint),
            *small_flags()]
    runs = [subprocess.Popen(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    refused = next(stderr for code, _, stderr in results if code == 2)
    assert "is in use by another segpipe command" in refused
    ids = Counter(i for p in prediction_files(str(out / "predictions"))
                  for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
    assert len(ids) == 4 and max(ids.values()) == 1
    assert not (out / LEASE_NAME).exists()     # released at the end


@pytest.mark.parametrize("content", [b"", b"\x00\x00garbage", b"[]", b'{"run_id": "x"}',
                                     b'{"run_id": "x", "renewed": "yesterday"}',
                                     b'{"run_id": "x", "renewed": 1e999, "pid": [1]}'])
def test_an_unreadable_lease_is_judged_by_its_age_and_says_how_out(tmp_path, monkeypatch, content):
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    lease_file = tmp_path / LEASE_NAME
    lease_file.write_bytes(content)      # e.g. what a full disk left
    with pytest.raises(LeaseHeld) as caught:
        check_free(str(tmp_path))        # the preflight's check already judges it
    message = str(caught.value)
    assert "None" not in message and f"delete {lease_file}" in message
    with pytest.raises(LeaseHeld):
        acquire(str(tmp_path))
    long_ago = time.time() - lease_module.STALE_AFTER_S - 5
    os.utime(lease_file, (long_ago, long_ago))
    check_free(str(tmp_path))
    held = acquire(str(tmp_path))        # stale: taken over
    assert json.loads(lease_file.read_text())["run_id"] == held.run_id
    held.release()


def test_a_lease_deleted_under_a_live_run_is_written_again_and_its_work_kept(tmp_path):
    held = acquire(str(tmp_path))
    held.start_renewing(every_s=0.05)
    try:
        (tmp_path / LEASE_NAME).unlink()
        check_holder(str(tmp_path), held.run_id)     # a deleted lease is no take-over
        deadline = time.time() + 10
        while not (tmp_path / LEASE_NAME).exists() and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == held.run_id
        assert held.lost is None
    finally:
        held.release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_a_run_being_written_is_not_read_until_it_finishes(tmp_path, capsys):
    """Export, review and eval of a run still segmenting said its files were "not recorded by
    the finished run" and advised --resume or --overwrite; they now say it is being written."""
    import segpipe.cli as cli
    from test_untrusted_runs import run_with

    run = run_with(tmp_path)
    held = acquire(str(run), command="segpipe segment in run")
    commands = [["export", str(run), "--to", str(tmp_path / "c")],
                ["review", str(run), "--to", str(tmp_path / "r")],
                ["eval", str(run), "--gt", str(tmp_path / "gt.json")],
                ["render", str(run), "--images", str(tmp_path), "--to", str(tmp_path / "g")]]
    for command in commands:
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert "is being written now by run" in err and "segpipe segment in run" in err, command
    held.release()
    assert cli.main(commands[0] + ["--no-progress"]) == 0

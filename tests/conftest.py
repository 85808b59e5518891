"""Shared fixtures: a seeded random checkpoint file, a small model config, a local Ray."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))   # bench/ (precision_stages)

from segpipe.config import SegmentConfig
from segpipe.model.build import ModelSpec, build_model

#: Small and fast: images resized to 128 px, 10 detections from 100 proposals, one predictor
#: actor of one thread. The default pool on 2 CPUs is two such actors once a run has more than
#: one batch (fewer images get one: ``fit_pool_to_work``); at 128 px a second actor's start and
#: model load cost more CPU than its share of the images saves (docs/benchmarks.md, "the test
#: suite"). The tests of the pool itself and the parity run (test_pipeline.py) keep the default.
SMALL = dict(min_size=128, max_size=200, detections_per_image=10, proposals_per_image=100,
             batch_size=3, progress=False, actors="1", torch_threads=1)
CHECKPOINT_SEED = 1234


def small_config(input_dir, output_dir, weights, **changes) -> SegmentConfig:
    return SegmentConfig(input=str(input_dir), output=str(output_dir), weights=str(weights),
                         **{**SMALL, **changes})


def small_spec(num_classes: int = 91, **changes) -> ModelSpec:
    config = small_config("in", "out", "random", **changes)
    return ModelSpec.from_config(config, num_classes)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Seeded random weights saved as a plain state_dict file, loaded through --weights PATH."""
    torch.manual_seed(CHECKPOINT_SEED)
    model = build_model(small_spec())
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_random.pth"
    torch.save(model.state_dict(), path)
    return path


def decisive_classifier(model, slope: float = 0.05) -> None:
    """Make a randomly initialised classifier pick different classes for different proposals.

    Random box-head features share one dominant direction, so random class rows let one class
    win everywhere, and a test of the label → category mapping would see a single label. Here
    class k's logit is ``(k - 1) * slope * t`` plus a bias, where ``t`` is a proposal's feature
    along the mean feature direction of the test photos: each class wins on one band of ``t``
    (cut at its quantiles), with margins of several logits, so no result hangs on a near-tie.
    """
    from images import photo

    features = []
    hook = model.roi_heads.box_head.register_forward_hook(
        lambda module, inputs, output: features.append(output.detach()))
    with torch.inference_mode():
        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            model([torch.from_numpy(photo(name).copy()).permute(2, 0, 1).float() / 255])
    hook.remove()
    f = torch.cat(features)
    direction = f.mean(0) / f.mean(0).norm()
    classes = model.roi_heads.box_predictor.cls_score.out_features
    cuts = torch.quantile(f @ direction, torch.linspace(0, 1, classes)[1:-1])
    with torch.no_grad():
        weight = model.roi_heads.box_predictor.cls_score.weight
        bias = model.roi_heads.box_predictor.cls_score.bias
        weight.zero_()
        bias.zero_()
        bias[0] = -1.0                      # background: never the most likely
        for k in range(1, classes):
            weight[k] = (k - 1) * slope * direction
            if k > 1:
                bias[k] = bias[k - 1] - slope * cuts[k - 2]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(arch, num_classes, wrap=None)``: seeded random weights of any
    architecture and class count, saved as a state_dict file (``wrap``: under that key)."""
    made: dict[tuple, Path] = {}

    def make(arch: str = "maskrcnn_resnet50_fpn", num_classes: int = 91,
             wrap: str | None = None) -> Path:
        key = (arch, num_classes, wrap)
        if key not in made:
            torch.manual_seed(CHECKPOINT_SEED)
            model = build_model(small_spec(arch=arch, num_classes=num_classes))
            if num_classes != 91:
                decisive_classifier(model)
            state = model.state_dict()
            path = tmp_path_factory.mktemp("weights") / f"{arch}_{num_classes}.pth"
            torch.save({wrap: state, "epoch": 3} if wrap else state, path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray for in-process pipeline runs, started once for the whole run (each start
    and stop costs about 5 s) and stopped at its end; tests that need a Ray of their own
    start it in a subprocess (the CLI), which starts its own."""
    import ray

    from segpipe.cluster.session import local_ray_system_config

    os.environ.pop("RAY_ADDRESS", None)
    # as a command's own Ray: its workers at this process's priority
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=local_ray_system_config())
    yield
    ray.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a stand-in for download.pytorch.org); yield
    its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def http_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_folder(folder) as base:
        yield folder, base


def served_checkpoint(folder: Path, source: Path, stem: str = "maskrcnn_custom") -> str:
    """Copy ``source`` into ``folder`` under a torchvision-style name with its sha256 prefix."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    name = f"{stem}-{digest[:8]}.pth"
    (folder / name).write_bytes(source.read_bytes())
    return name


#: Fixtures that start Ray: a test using one (directly or through another fixture) is marked
#: ``ray``. Tests that start Ray in a subprocess (the CLI's segment, render) say so with
#: ``@pytest.mark.ray`` or their module's ``pytestmark``.
RAY_FIXTURES = {"local_ray", "cluster", "autoscaling_cluster", "awkward_run"}


#: The files that take longest (measured: the suite's durations in docs/benchmarks.md), run
#: first: ``make test``'s two workers take a file at a time (``--dist loadfile``), and a long
#: file started last would leave one worker running alone at the end. A file not named keeps
#: its place after these. (pytest-xdist would put the files with the most tests first, the
#: longest last: ``make test`` passes ``--no-loadscope-reorder``.)
LONGEST_FIRST = ("test_resilience.py", "test_cluster.py", "test_export.py", "test_tiles.py",
                 "test_cli.py", "test_autoscaling.py", "test_inputs.py", "test_api.py",
                 "test_lease.py", "test_custom_models.py", "test_precision.py",
                 "test_pipeline.py", "test_yolo.py", "test_s3.py", "test_huggingface.py",
                 "test_shapes_bench.py", "test_weights.py", "test_annotations.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    # a stable sort: the tests of a file keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


ROOT = Path(__file__).resolve().parent.parent


def _checkout_state() -> Optional[str]:
    """``git status --porcelain`` of the checkout (untracked files listed one by one), or None
    outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def pytest_sessionstart(session) -> None:
    if not hasattr(session.config, "workerinput"):   # the controller, with or without xdist
        session.config.stash[_CHECKOUT] = _checkout_state()
    # Ultralytics writes its settings file on import: into the run's own folder, for this
    # process and the Ray workers it starts (they inherit the environment), not the home's
    import tempfile

    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="segpipe-tests-ultralytics-")
        session.config.stash[_YOLO_CONFIG] = os.environ["YOLO_CONFIG_DIR"]


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run when a test wrote into the checkout: tests write only in their own temp
    folders, and nothing a test does may show in ``git status``."""
    folder = session.config.stash.get(_YOLO_CONFIG, None)
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("YOLO_CONFIG_DIR", None)
    if hasattr(session.config, "workerinput"):
        return
    before = session.config.stash.get(_CHECKOUT, None)
    after = _checkout_state()
    if before is None or after is None or after == before:
        return
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("the test run changed the checkout (git status), which no test may: "
                            + "; ".join(changed[:10]), red=True)
    session.exitstatus = 1


_CHECKOUT = pytest.StashKey[Optional[str]]()
_YOLO_CONFIG = pytest.StashKey[str]()

"""Shared fixtures: a seeded random checkpoint file, a small model config, a local Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from segpipe.config import SegmentConfig  # noqa: E402
from segpipe.model import ModelSpec, build_model  # noqa: E402

#: Small and fast: images resized to 128 px, 10 detections from 100 proposals.
SMALL = dict(min_size=128, max_size=200, detections_per_image=10, proposals_per_image=100,
             batch_size=3, progress=False)
CHECKPOINT_SEED = 1234


def small_config(input_dir, output_dir, weights, **changes) -> SegmentConfig:
    return SegmentConfig(input=str(input_dir), output=str(output_dir), weights=str(weights),
                         **{**SMALL, **changes})


def small_spec(**changes) -> ModelSpec:
    config = small_config("in", "out", "random", **changes)
    return ModelSpec.from_config(config)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Seeded random weights saved as a plain state_dict file, loaded through --weights PATH."""
    torch.manual_seed(CHECKPOINT_SEED)
    model = build_model(small_spec())
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for in-process pipeline runs, started once per test module."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()

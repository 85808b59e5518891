"""Weights: checkpoints load with weights_only=True, mismatches are clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import small_spec
from segpipe.config import ConfigError
from segpipe.model import build_model, resolve_weights, state_dict_sha256


class NotAWeight:
    """Pickling this into a checkpoint must not be honoured by a weights_only load."""


def test_file_weights_load_and_identify(checkpoint):
    resolved = resolve_weights(str(checkpoint), small_spec())
    assert resolved.kind == "file" and len(resolved.sha256) == 64
    model = build_model(small_spec())
    model.load_state_dict(resolved.state_dict)


def test_training_checkpoint_with_model_key_is_accepted(tmp_path, checkpoint):
    path = tmp_path / "train.pth"
    torch.save({"model": torch.load(checkpoint, weights_only=True), "epoch": 3}, path)
    resolved = resolve_weights(str(path), small_spec())
    assert state_dict_sha256(resolved.state_dict) == state_dict_sha256(
        torch.load(checkpoint, weights_only=True))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotAWeight()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        resolve_weights(str(path), small_spec())


def test_checkpoint_of_another_architecture_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="do not fit maskrcnn_resnet50_fpn_v2"):
        resolve_weights(str(checkpoint), small_spec(arch="maskrcnn_resnet50_fpn_v2"))


def test_missing_file_and_random_weights(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.pth"), small_spec())
    a = resolve_weights("random", small_spec(), seed=7)
    b = resolve_weights("random", small_spec(), seed=7)
    assert a.sha256 == b.sha256 != resolve_weights("random", small_spec(), seed=8).sha256
    assert "RANDOM WEIGHTS" in a.warning

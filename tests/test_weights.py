"""Weights: where they come from, downloads from 127.0.0.1, safe loading, any number of classes."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import served_checkpoint, small_spec
from segpipe.model import weights as weights_module
from segpipe.model.categories import COCO_TABLE, Category
from segpipe.config import ConfigError
from segpipe.model.build import (build_loaded_model, build_model, check_fits,
                                  checkpoint_architectures, state_dict_sha256)
from segpipe.model.families import family_of
from segpipe.model.resolved import resolve_weights
from segpipe.model.weights import WeightsError, download_checkpoint, hash_prefix, weights_source


class NotAWeight:
    """Pickling this into a checkpoint must not be honoured by a weights_only load."""


def test_file_weights_load_and_identify(checkpoint):
    resolved = resolve_weights(str(checkpoint), small_spec())
    assert resolved.kind == "file"
    assert resolved.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    reference = torch.load(checkpoint, weights_only=True)
    assert state_dict_sha256(resolved.payload) == state_dict_sha256(reference)
    assert resolved.spec.num_classes == 91 and resolved.categories == COCO_TABLE
    assert resolved.warnings == []


@pytest.mark.parametrize("wrap", ["model", "state_dict"])
def test_training_checkpoints_and_data_parallel_prefixes_are_accepted(tmp_path, checkpoint, wrap):
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "train.pth"
    torch.save({wrap: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    resolved = resolve_weights(str(path), small_spec())
    assert state_dict_sha256(resolved.payload) == state_dict_sha256(state)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotAWeight()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        resolve_weights(str(path), small_spec())


def test_a_checkpoint_of_another_architecture_names_the_right_flag(checkpoint, make_checkpoint):
    with pytest.raises(ConfigError, match="are a maskrcnn_resnet50_fpn checkpoint, not "
                                          "maskrcnn_resnet50_fpn_v2: pass --arch "
                                          "maskrcnn_resnet50_fpn$"):
        resolve_weights(str(checkpoint), small_spec(arch="maskrcnn_resnet50_fpn_v2"))
    faster = make_checkpoint("fasterrcnn_resnet50_fpn", 3)
    with pytest.raises(ConfigError, match="pass --arch fasterrcnn_resnet50_fpn$"):
        resolve_weights(str(faster), small_spec())


def test_every_architecture_is_told_apart_by_its_keys():
    for arch in family_of("maskrcnn_resnet50_fpn").arches:   # the torchvision family
        with torch.device("meta"):
            model = getattr(torchvision.models.detection, arch)(weights=None,
                                                                  weights_backbone=None,
                                                                  num_classes=5)
        assert checkpoint_architectures(model.state_dict()) == [arch]


def test_a_loaded_model_is_the_checkpoint_bit_for_bit_with_nothing_left_unset():
    """``build_loaded_model`` skips torchvision's random initialisation (the model is built on
    the meta device, given memory, then loaded strictly). That is sound only while every
    parameter and buffer is a state-dict key (anything else would keep uninitialised memory),
    and it must predict what a randomly initialised model loaded with the same weights does."""
    for arch in family_of("maskrcnn_resnet50_fpn").arches:
        spec = dataclasses.replace(small_spec(5), arch=arch)
        torch.manual_seed(3)
        reference = build_model(spec)
        state = reference.state_dict()
        model = build_loaded_model(spec, state)
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        assert names == set(state), arch
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), arch
        assert not model.training
        image = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1))]
        with torch.no_grad():
            expected, got = reference(image)[0], model(image)[0]
        assert expected.keys() == got.keys() and len(got["boxes"]) > 0, arch
        assert all(torch.equal(expected[k], got[k]) for k in expected), arch
    with pytest.raises(ConfigError, match="do not fit .*size mismatch for roi_heads"):
        check_fits(state, dataclasses.replace(spec, num_classes=6), "ckpt.pth")


def test_torchvisions_own_pretrained_layout_is_recognised():
    """torchvision's pretrained files use frozen BatchNorm (no num_batches_tracked) and the
    old RPN head name (rpn.head.conv.weight); both must still count as the architecture."""
    with torch.device("meta"):
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None,
                                                                   weights_backbone=None)
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    for kind in ("weight", "bias"):
        state[f"rpn.head.conv.{kind}"] = state.pop(f"rpn.head.conv.0.0.{kind}")
    assert checkpoint_architectures(state) == ["maskrcnn_resnet50_fpn"]


def test_not_a_detector_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ConfigError, match="not a torchvision maskrcnn_resnet50_fpn state dict"):
        resolve_weights(str(path), small_spec())


def test_any_number_of_classes_with_or_without_names(make_checkpoint):
    path = make_checkpoint("maskrcnn_resnet50_fpn", 4)
    unnamed = resolve_weights(str(path), small_spec())
    assert unnamed.spec.num_classes == 4
    assert [(c.id, c.name) for c in unnamed.categories.categories] == [
        (1, "class_1"), (2, "class_2"), (3, "class_3")]
    assert any("UNNAMED CLASSES" in w for w in unnamed.warnings)
    named = (Category(7, "cat"), Category(3, "cup"), Category(42, "rocket"))
    resolved = resolve_weights(str(path), small_spec(), categories=named)
    assert resolved.categories.categories == named and resolved.warnings == []
    assert [resolved.categories.category_of(k) for k in (1, 2, 3)] == [
        (7, "cat"), (3, "cup"), (42, "rocket")]
    with pytest.raises(ConfigError, match="names 2 categories, but the model has 4 classes"):
        resolve_weights(str(path), small_spec(), categories=named[:2])
    background = (Category(0, "__background__"),) + named
    with pytest.raises(ConfigError, match="leave out the background entry"):
        resolve_weights(str(path), small_spec(), categories=background)


def test_box_and_mask_predictors_must_agree(tmp_path, make_checkpoint):
    state = torch.load(make_checkpoint("maskrcnn_resnet50_fpn", 4), weights_only=True)
    for key in ("mask_fcn_logits.weight", "mask_fcn_logits.bias"):
        full = f"roi_heads.mask_predictor.{key}"
        state[full] = torch.cat([state[full], state[full][:1]])
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="box predictor has 4 classes but the mask predictor "
                                          "has 5"):
        resolve_weights(str(path), small_spec())


def test_missing_file_and_random_weights(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.pth"), small_spec())
    a = resolve_weights("random", small_spec(), seed=7)
    b = resolve_weights("random", small_spec(), seed=7)
    assert a.sha256 == b.sha256 != resolve_weights("random", small_spec(), seed=8).sha256
    assert "RANDOM WEIGHTS" in a.warnings[0]
    custom = resolve_weights("random", small_spec(), categories=(Category(5, "a"),))
    assert custom.spec.num_classes == 2


# --- torch's cache and downloads, without torch ---

@pytest.mark.parametrize("env", [{}, {"TORCH_HOME": "/tmp/th"}, {"XDG_CACHE_HOME": "/tmp/xdg"},
                                 {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "/tmp/xdg"}])
def test_cache_folder_is_torch_hubs(monkeypatch, env):
    for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert weights_module.checkpoints_dir() == Path(torch.hub.get_dir()) / "checkpoints"
    assert str(weights_module.checkpoints_dir()) in weights_module.describe_cache_folder()


def test_pretrained_table_is_torchvisions():
    for arch, (member, url) in weights_module.PRETRAINED.items():
        enum = torchvision.models.get_model_weights(arch).COCO_V1
        assert (f"{type(enum).__name__}.{enum.name}", enum.url) == (member, url)
    assert set(weights_module.PRETRAINED) == set(family_of("maskrcnn_resnet50_fpn").arches)
    assert hash_prefix("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth") == "bf2d0c1e"
    assert hash_prefix("model_final.pth") is None


def test_a_url_checkpoint_downloads_into_an_empty_torch_home(monkeypatch, tmp_path, checkpoint,
                                                             http_folder):
    folder, base = http_folder
    name = served_checkpoint(folder, checkpoint)
    home = tmp_path / "fresh-home"          # does not exist: the download must create it
    monkeypatch.setenv("TORCH_HOME", str(home))
    resolved = resolve_weights(f"{base}/{name}", small_spec())
    cached = weights_module.cached_path(f"{base}/{name}")
    assert cached.is_relative_to(home / "hub" / "checkpoints") and cached.name == name
    assert cached.read_bytes() == checkpoint.read_bytes()
    assert resolved.kind == "url" and resolved.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    # no .partial left behind; the download's sha256 recorded beside the file
    assert sorted(p.name for p in cached.parent.iterdir()) == [name, name + ".sha256"]
    (folder / name).unlink()                # cached now: no second download
    assert resolve_weights(f"{base}/{name}", small_spec()).sha256 == resolved.sha256


def test_a_file_that_does_not_match_its_hash_is_refused_and_deleted(monkeypatch, tmp_path,
                                                                    checkpoint, http_folder):
    folder, base = http_folder
    (folder / "maskrcnn_custom-0badc0de.pth").write_bytes(checkpoint.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsError, match="name promises 0badc0de") as info:
        resolve_weights(f"{base}/maskrcnn_custom-0badc0de.pth", small_spec())
    assert "Put the file maskrcnn_custom-0badc0de.pth" in str(info.value)
    cached = weights_module.cached_path(f"{base}/maskrcnn_custom-0badc0de.pth")
    assert list(cached.parent.iterdir()) == []
    # A corrupt file already in the cache is caught too, not loaded.
    cached.write_bytes(checkpoint.read_bytes())
    with pytest.raises(WeightsError, match="corrupt or not the file its name promises"):
        resolve_weights(f"{base}/maskrcnn_custom-0badc0de.pth", small_spec())


def test_missing_url_names_the_http_status(tmp_path, http_folder):
    _, base = http_folder
    with pytest.raises(WeightsError, match="HTTP 404"):
        download_checkpoint(f"{base}/nothing-1234abcd.pth", tmp_path / "c" / "x-1234abcd.pth")


def _serve_once(respond) -> tuple[socket.socket, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        respond(conn)

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}/w-1234abcd.pth"


def test_a_stalled_server_times_out_and_leaves_nothing(tmp_path):
    stop = threading.Event()
    listener, url = _serve_once(lambda conn: (conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000), stop.wait(30)))
    start = time.monotonic()
    with pytest.raises(WeightsError, match="sent nothing for 1 s .after 1000 bytes"):
        download_checkpoint(url, tmp_path / "c" / "w-1234abcd.pth", timeout=1)
    assert time.monotonic() - start < 10
    stop.set()
    listener.close()
    assert list((tmp_path / "c").iterdir()) == []


def test_a_download_that_breaks_off_is_refused(tmp_path):
    def respond(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
        conn.close()

    listener, url = _serve_once(respond)
    with pytest.raises(WeightsError, match="after 100 (of 5000 )?bytes|broke off"):
        download_checkpoint(url, tmp_path / "c" / "w-1234abcd.pth", timeout=5)
    listener.close()
    assert list((tmp_path / "c").iterdir()) == []


def test_weights_source_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(WeightsError, match="is a folder"):
        weights_source(str(tmp_path), "maskrcnn_resnet50_fpn")
    with pytest.raises(WeightsError, match="only local files and http"):
        weights_source("s3://bucket/w.pth", "maskrcnn_resnet50_fpn")
    assert weights_source("pretrained", "maskrcnn_resnet50_fpn").url.endswith("bf2d0c1e.pth")


def test_two_urls_with_one_file_name_are_two_checkpoints(monkeypatch, tmp_path, checkpoint,
                                                          make_checkpoint, http_folder):
    """The cache is keyed by the whole URL: b/model.pth is downloaded and loaded after
    a/model.pth, and the sha256 recorded is that of the bytes loaded."""
    folder, base = http_folder
    other = make_checkpoint(num_classes=5)
    for sub, source in (("a", checkpoint), ("b", other)):
        (folder / sub).mkdir()
        (folder / sub / "model.pth").write_bytes(source.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    first = resolve_weights(f"{base}/a/model.pth", small_spec())
    second = resolve_weights(f"{base}/b/model.pth", small_spec())
    assert first.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert second.sha256 == hashlib.sha256(other.read_bytes()).hexdigest()
    assert second.spec.num_classes == 5 and first.spec.num_classes == 91
    assert state_dict_sha256(second.payload) == state_dict_sha256(torch.load(other))
    # a signed URL signed anew finds the same file; a cached file changed since is refused
    signed = weights_module.cached_path(f"{base}/a/model.pth?sig=ONE&se=1")
    assert signed == weights_module.cached_path(f"{base}/a/model.pth?sig=TWO&se=1")
    cached = weights_module.cached_path(f"{base}/a/model.pth")
    cached.write_bytes(other.read_bytes())
    (folder / "a" / "model.pth").unlink()
    with pytest.raises(WeightsError, match="changed since it was downloaded"):
        resolve_weights(f"{base}/a/model.pth", small_spec())


def test_a_half_precision_checkpoint_is_loaded_with_a_warning(tmp_path, checkpoint):
    half = {k: v.half() if v.is_floating_point() else v
            for k, v in torch.load(checkpoint, weights_only=True).items()}
    torch.save(half, tmp_path / "half.pth")
    resolved = resolve_weights(str(tmp_path / "half.pth"), small_spec())
    assert any("float16" in w and "widened to float32" in w for w in resolved.warnings)
    assert not any("float16" in w for w in resolve_weights(str(checkpoint), small_spec()).warnings)

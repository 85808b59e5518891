"""``decode: predictor``: which files travel as JPEG bytes, that decoding them in the predictor
gives the CPU decoder's pixels and detections, and that a broken one costs only its own row."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SMALL, small_config
from images import photo
from PIL import Image

from segpipe import schema
from segpipe.config import ConfigError
from segpipe.io.decode import DecodeError, DecodeLimits, decode_batch, decode_image
from segpipe.model.families import check_decode
from segpipe.model import jpeg as jpeg_module
from segpipe.model.jpeg import decode_jpegs
from segpipe.output.run_folder import prediction_files

DETECTION_KEYS = ("category_id", "score", "bbox", "area", "segmentation", "soft_mask")
LIMITS = DecodeLimits(max_pixels=1 << 26, max_bytes=1 << 26)
CPU = torch.device("cpu")


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()


def plain(value):
    """A value of the API's numpy columns as Parquet reads it (no size: NaN there, None here)."""
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def jpeg(pixels: np.ndarray, **options) -> bytes:
    return encoded(Image.fromarray(pixels), **options)


def turned(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(pixels, quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("options", [dict(quality=90, subsampling=0), dict(quality=75),
                                     dict(quality=95, subsampling=1),
                                     dict(quality=90, progressive=True)],
                         ids=["4:4:4", "4:2:0", "4:2:2", "progressive"])
def test_the_predictors_cpu_decoder_gives_pillows_pixels(options):
    files = [jpeg(photo(name, scale), **options)
             for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
             for scale in (0.5, 0.37)]
    expected = [decode_image(data, LIMITS) for data in files]
    decoded = decode_jpegs(files, [e.shape[:2] for e in expected], CPU)
    for want, got in zip(expected, decoded):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert np.array_equal(got.numpy(), want)


def test_only_jpegs_a_device_decodes_exactly_travel_undecoded(tmp_path):
    pixels = photo("chelsea", 0.25)
    files = {
        "plain.jpg": jpeg(pixels, quality=90),
        "progressive.jpg": jpeg(pixels, quality=90, progressive=True),
        "upright.jpg": turned(pixels, 1),
        "turned.jpg": turned(pixels, 6),                      # Pillow turns it: CPU decodes
        "gray.jpg": jpeg(np.ascontiguousarray(pixels[:, :, 0])),
        "cmyk.jpg": encoded(Image.fromarray(pixels).convert("CMYK")),
        "camera.jpg": encoded(Image.fromarray(pixels), "MPO", save_all=True,   # two JPEGs
                              append_images=[Image.fromarray(pixels[::-1].copy())]),
        "photo.png": encoded(Image.fromarray(pixels), "PNG"),
        "truncated.jpg": jpeg(pixels, quality=90)[:2000],      # header fine: travels, fails later
        "not_an_image.jpg": b"\xff\xd8\xff" + b"x" * 64,
        "huge.jpg": jpeg(np.zeros((300, 400, 3), np.uint8)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = sorted(files)
    source = pa.table({"image_id": pa.array(range(len(names)), pa.int64()),
                       "file_name": names, "path": [str(tmp_path / n) for n in names],
                       "size": [len(files[n]) for n in names]})
    limits = DecodeLimits(max_pixels=300 * 399, max_bytes=1 << 26)
    both = {False: decode_batch(source, str(tmp_path), limits).to_pylist(),
            True: decode_batch(source, str(tmp_path), limits, jpeg_to_predictor=True).to_pylist()}
    assert schema.JPEG not in both[False][0]
    kept = {row["file_name"] for row in both[True] if row[schema.JPEG] is not None}
    assert kept == {"plain.jpg", "progressive.jpg", "upright.jpg", "truncated.jpg"}
    for cpu, device in zip(both[False], both[True]):
        name = cpu["file_name"]
        if name in kept:
            assert device[schema.JPEG] == files[name] and device[schema.PIXELS] == b""
            assert (device["width"], device["height"]) == Image.open(io.BytesIO(files[name])).size
        else:   # decoded on the CPU as before, refusals and their reasons included
            assert device == {**cpu, schema.JPEG: None}
    rows = {row["file_name"]: row for row in both[True]}
    assert rows["huge.jpg"]["error"] == f"decode: image is 400x300 = 120000 pixels, over " \
                                        f"max_image_pixels={300 * 399}"
    assert rows["not_an_image.jpg"]["status"] == "error"
    assert (rows["turned.jpg"]["width"], rows["turned.jpg"]["height"]) == pixels.shape[:2]


def test_a_jpeg_that_does_not_decode_costs_only_its_own_row_and_pillows_reason():
    good = jpeg(photo("coffee", 0.25), quality=90)
    truncated = good[:len(good) // 2]
    size = decode_image(good, LIMITS).shape[:2]
    out = decode_jpegs([good, truncated, good, good], [size, size, size, (7, 9)], CPU)
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    with pytest.raises(DecodeError) as refused:   # what decode: cpu says of it
        decode_image(truncated, LIMITS)
    assert out[1] == str(refused.value) and "truncated" in out[1]
    assert out[3].startswith(f"image is {size[1]}x{size[0]} = ")   # not the size it claimed


def test_what_the_devices_decoder_refuses_pillow_decodes(monkeypatch):
    """nvJPEG refuses some JPEGs Pillow reads (arithmetic coding; no room on the device):
    those are decoded by Pillow on the predictor's host, and a batch the device fails on is
    retried file by file."""
    files = [jpeg(photo(name, 0.25), quality=90) for name in ("coffee", "rocket", "chelsea")]
    expected = [decode_image(data, LIMITS) for data in files]
    real = jpeg_module._decode
    calls = []

    def refuses_the_rocket(batch, device):
        calls.append(len(batch))
        if files[1] in batch:
            raise RuntimeError("nvjpeg: unsupported JPEG (arithmetic coding)")
        return real(batch, device)

    monkeypatch.setattr(jpeg_module, "_decode", refuses_the_rocket)
    out = decode_jpegs(files, [e.shape[:2] for e in expected], CPU)
    assert calls == [3, 1, 1, 1]
    assert [type(got) for got in out] == [torch.Tensor, np.ndarray, torch.Tensor]   # on the host
    for want, got in zip(expected, out):
        assert np.array_equal(np.asarray(got), want)


def test_decode_predictor_is_refused_for_families_that_take_host_images():
    check_decode("maskrcnn_resnet50_fpn", "predictor")
    check_decode("ultralytics", "cpu")
    for arch in ("ultralytics", "transformers"):
        with pytest.raises(ConfigError, match=f"--arch {arch} .* use --decode cpu"):
            check_decode(arch, "predictor")


@pytest.mark.ray
def test_a_run_that_decodes_in_the_predictor_gives_the_cpu_decoders_rows(tmp_path, checkpoint,
                                                                          local_ray):
    import segpipe

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        (photos / f"{name}.jpg").write_bytes(jpeg(photo(name, 0.4), quality=90))
    (photos / "rocket.jpg").write_bytes(turned(photo("rocket", 0.4), 8))   # decoded on CPU
    Image.fromarray(photo("chelsea", 0.4)).save(photos / "chelsea.png")
    (photos / "truncated.jpg").write_bytes(jpeg(photo("coffee", 0.4), quality=90)[:3000])
    # one image per forward pass and one torch thread: nothing but the decoder differs
    segpipe.run_segment(small_config(photos, tmp_path / "out", checkpoint, batch_size=1,
                                     torch_threads=1, decode="predictor"))
    run = {row["file_name"]: row for path in prediction_files(str(tmp_path / "out" / "predictions"))
           for row in pq.read_table(path).to_pylist()}
    paths = sorted(photos.iterdir())
    before = torch.get_num_threads()
    try:   # the CPU decoder's rows, from the API's Predictor in this process
        cpu = segpipe.Predictor({**SMALL, "weights": str(checkpoint), "batch_size": 1,
                                 "torch_threads": 1}, root=str(photos))(
            {"bytes": np.array([p.read_bytes() for p in paths], dtype=object),
             "path": np.array([str(p) for p in paths])})
    finally:
        torch.set_num_threads(before)
    assert sorted(run) == [p.name for p in paths] == list(cpu["file_name"])
    for k, name in enumerate(cpu["file_name"]):
        row = run[name]
        assert [row[key] for key in ("image_id", "width", "height", "status", "error")] == \
            [plain(cpu[key][k]) for key in ("image_id", "width", "height", "status", "error")]
        assert [{key: d[key] for key in DETECTION_KEYS} for d in row["detections"] or []] == \
            [{key: d[key] for key in DETECTION_KEYS} for d in cpu["detections"][k]]
        assert row["status"] == "error" if name == "truncated.jpg" else row["detections"]
    operators = json.loads((tmp_path / "out" / "run.json").read_text())["cluster"][
        "operators"]   # what Ray Data measured of each stage
    for stage in ("MapBatches(decode_batch)", "MapBatches(PredictStage)", "MapBatches(MaskEncoder)"):
        assert operators[stage]["tasks"] >= 1 and operators[stage]["active_s"] >= 0
        assert operators[stage]["wall_s"] > 0 and operators[stage]["cpu_s"] > 0


def test_tiles_of_an_image_the_predictor_decoded_are_the_cpu_decoders(checkpoint):
    """A tiled image decoded in the predictor is cut into the same views (a tensor's crops)
    and gives the same detections, through the API's ``Predictor`` (no Ray)."""
    import segpipe

    files = [jpeg(photo(name, 0.6), quality=90) for name in ("astronaut", "coffee")]
    batch = {"bytes": np.array(files, dtype=object),
             "path": np.array(["astronaut.jpg", "coffee.jpg"])}
    rows = {}
    for decode in ("cpu", "predictor"):
        predictor = segpipe.Predictor({**SMALL, "weights": str(checkpoint), "batch_size": 1,
                                       "tile": 128, "tile_full_pass": True, "decode": decode})
        rows[decode] = predictor(dict(batch))
    assert list(rows["cpu"]["status"]) == ["ok", "ok"]
    for name in ("width", "height", "status", "file_name"):
        assert list(rows["predictor"][name]) == list(rows["cpu"][name])
    found = 0
    for cpu, device in zip(rows["cpu"]["detections"], rows["predictor"]["detections"]):
        assert [d["segmentation"] for d in device] == [d["segmentation"] for d in cpu]
        assert [d["bbox"] for d in device] == [d["bbox"] for d in cpu]
        assert all(d["parts"] for d in device) and [d["parts"] for d in device] == \
            [d["parts"] for d in cpu]
        found += len(cpu)
    assert found > 0


def test_on_a_gpu_the_callers_stream_is_idle_before_the_decoder_writes(monkeypatch):
    """torchvision's CUDA decoder writes its outputs from a stream of its own without waiting
    for the caller's (pytorch/vision#9606): segpipe waits for the caller's stream first."""
    import torchvision.io

    order = []

    class Stream:
        def synchronize(self):
            order.append("caller's stream idle")

    def nvjpeg(encoded, mode, device):
        order.append(f"decode {len(encoded)} on {device}")
        return [torch.zeros(3, 2, 3, dtype=torch.uint8) for _ in encoded]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", nvjpeg)
    out = decode_jpegs([b"\xff\xd8\xff", b"\xff\xd8\xff"], [(2, 3), (2, 3)], torch.device("cuda"))
    assert order == ["caller's stream idle", "decode 2 on cuda"]
    assert [tuple(image.shape) for image in out] == [(2, 3, 3), (2, 3, 3)]

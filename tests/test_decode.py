"""decode_image on every awkward kind of file."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from images import AWKWARD_EXPECTED, gray16_of, photo, write_awkward_inputs
from segpipe.io.decode import DecodeError, DecodeLimits, decode_image

LIMITS = DecodeLimits(max_pixels=100_000_000, max_bytes=1 << 30)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    write_awkward_inputs(folder)
    return folder


#: Why each bad file fails, as its error says.
REASONS = {"empty.jpg": "empty file (0 bytes)", "truncated.jpg": "truncat",
           "notes.png": "format not recognised",
           "huge_header.png": "3600000000 pixels, over max_image_pixels"}


def pillow_rgb(data: bytes) -> np.ndarray:
    """What a person sees: Pillow's own EXIF transpose and RGB conversion, first frame."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("name", sorted(AWKWARD_EXPECTED))
def test_each_file_decodes_to_pillows_pixels_or_fails_with_its_reason(awkward, name):
    data = (awkward / name).read_bytes()
    if AWKWARD_EXPECTED[name] == "ok":
        rgb = decode_image(data, LIMITS)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.flags.c_contiguous
        if name != "gray16.png":  # Pillow's own 16-bit conversion clips; see below
            np.testing.assert_array_equal(rgb, pillow_rgb(data))
    else:
        with pytest.raises(DecodeError, match=re.escape(REASONS[name])):
            decode_image(data, LIMITS)


def test_decoding_stays_pillows_where_a_library_replaced_image_open(awkward, monkeypatch):
    """Importing Ultralytics replaces ``PIL.Image.open`` for the whole process with a wrapper
    that runs pip (to install pi-heif) at the first file Pillow cannot identify: segpipe's
    decoding, in such a process, still answers as Pillow does and calls no pip."""
    pytest.importorskip("ultralytics")
    monkeypatch.setattr(Image, "open", Image.open)   # whatever is there now, back after the test
    from ultralytics.utils import checks, patches

    pip_calls = []
    monkeypatch.setattr(checks, "check_requirements", lambda *a, **k: pip_calls.append(a))
    for wrapper in (patches.image_open,                      # keeps Pillow's in a module global
                    (lambda kept: lambda fp, *a, **k: kept(fp, *a, **k))(patches._image_open)):
        monkeypatch.setattr(Image, "open", wrapper)           # ... and one in a closure
        with pytest.raises(DecodeError, match="not a readable image: format not recognised$"):
            decode_image((awkward / "notes.png").read_bytes(), LIMITS)
        data = (awkward / "exif_rotated.jpg").read_bytes()
        np.testing.assert_array_equal(decode_image(data, LIMITS), pillow_rgb(data))
    assert pip_calls == []


def test_exif_orientation_is_applied_the_right_way(awkward):
    data = (awkward / "exif_rotated.jpg").read_bytes()
    rgb = decode_image(data, LIMITS)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert stored.shape == (100, 150, 3) and rgb.shape == (150, 100, 3)
    # Orientation 6: the stored picture turned 90° clockwise; the other way must not match.
    np.testing.assert_array_equal(rgb, np.rot90(stored, k=-1))
    assert not np.array_equal(rgb, np.rot90(stored, k=1))


def test_16_bit_keeps_the_high_byte(awkward):
    rgb = decode_image((awkward / "gray16.png").read_bytes(), LIMITS)
    sixteen = gray16_of(photo("coffee", 0.25))
    np.testing.assert_array_equal(rgb[:, :, 0], sixteen >> 8)
    assert not np.array_equal(rgb[:, :, 0], sixteen & 0xFF)   # the low byte differs here
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all()


def test_rgba_drops_alpha_like_convert_rgb(awkward):
    rgb = decode_image((awkward / "rgba.png").read_bytes(), LIMITS)
    np.testing.assert_array_equal(rgb, photo("coffee", 0.25))


def test_animated_gif_uses_first_frame(awkward):
    data = (awkward / "animated.gif").read_bytes()
    rgb = decode_image(data, LIMITS)
    frames = Image.open(io.BytesIO(data))
    first = np.asarray(frames.convert("RGB"))
    frames.seek(frames.n_frames - 1)
    last = np.asarray(frames.convert("RGB"))
    np.testing.assert_array_equal(rgb, first)
    assert not np.array_equal(rgb, last)


def test_pixel_and_byte_limits(awkward):
    data = (awkward / "gray.png").read_bytes()
    with pytest.raises(DecodeError, match="15000 pixels, over max_image_pixels=14999"):
        decode_image(data, DecodeLimits(max_pixels=14_999, max_bytes=1 << 30))
    with pytest.raises(DecodeError, match="over max_image_bytes=10"):
        decode_image(data, DecodeLimits(max_pixels=100_000_000, max_bytes=10))


def encoded(image: Image.Image, fmt: str = "TIFF") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_float_and_32_bit_images_are_scaled_to_8_bit_gray():
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    rgb = decode_image(encoded(Image.fromarray(unit, "F")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], (unit * 255).astype(np.uint8))  # [0, 1] → ×255
    big = np.array([[0.5, 100.0, 300.0, -4.0]], np.float32)
    rgb = decode_image(encoded(Image.fromarray(big, "F")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 1], [[0, 100, 255, 0]])           # kept, clipped
    small = np.array([[0, 7, 255]], np.int32)
    rgb = decode_image(encoded(Image.fromarray(small, "I")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 2], [[0, 7, 255]])                # 8-bit range as is
    wide = np.array([[256, 65535, 70000, 4660]], np.int32)
    rgb = decode_image(encoded(Image.fromarray(wide, "I")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], [[1, 255, 255, 18]])          # high byte
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()


def test_limits_allow_exactly_their_value(awkward):
    data = (awkward / "gray.png").read_bytes()
    assert decode_image(data, DecodeLimits(max_pixels=15_000, max_bytes=len(data))).shape == \
        (100, 150, 3)
    with pytest.raises(DecodeError, match=f"is {len(data)} bytes, over max_image_bytes="):
        decode_image(data, DecodeLimits(max_pixels=15_000, max_bytes=len(data) - 1))


def test_errors_name_the_format_and_stay_short():
    from segpipe.io.decode import _reason

    with pytest.raises(DecodeError, match="^JPEG does not decode: "):
        full = encoded(Image.fromarray(photo("coffee", 0.25)), "JPEG")
        decode_image(full[: len(full) // 2], LIMITS)
    long = _reason(ValueError("x" * 400))
    assert len(long) == 300 and long.endswith("x...")
    assert _reason(ValueError("  ")) == "ValueError" and _reason(OSError("short")) == "short"


def test_scaling_rules_at_their_boundaries():
    from segpipe.io.decode import _reason

    # Floats up to 1.0 are probabilities (×255); a maximum of 1.5 means values as they are.
    rgb = decode_image(encoded(Image.fromarray(np.array([[0.5, 1.5]], np.float32), "F")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], [[0, 1]])
    # 32-bit integers up to 255 are 8-bit values; from 256 on, 16-bit ones (high byte).
    rgb = decode_image(encoded(Image.fromarray(np.array([[0, 256]], np.int32), "I")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], [[0, 1]])
    assert _reason(ValueError("y" * 300)) == "y" * 300
    assert _reason(ValueError("y" * 301)) == "y" * 297 + "..."


def test_negative_integer_samples_are_black_not_wrapped():
    rgb = decode_image(encoded(Image.fromarray(np.array([[-5, 7]], np.int32), "I")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], [[0, 7]])
    rgb = decode_image(encoded(Image.fromarray(np.array([[-5, 300]], np.int32), "I")), LIMITS)
    np.testing.assert_array_equal(rgb[:, :, 0], [[0, 1]])


def test_a_source_row_without_bytes_or_path_is_an_error_row_not_a_failed_block(tmp_path):
    """A reader's row with neither the image's bytes nor a path (and no error of its own)
    becomes that row's error; the rows beside it decode."""
    from segpipe import schema
    from segpipe.io.decode import decode_batch
    from segpipe.io.sources import source_table

    data = encoded(Image.fromarray(photo("coffee", 0.25)), "PNG")
    batch = source_table(["shard.tar/a.png", "shard.tar/b.png"], [data, None], frozenset())
    rows = decode_batch(batch, str(tmp_path), LIMITS).to_pylist()
    assert [r["status"] for r in rows] == [schema.STATUS_OK, schema.STATUS_ERROR]
    assert rows[1]["error"] == "decode: the row holds neither the image's bytes nor its path"

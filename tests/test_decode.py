"""decode_image on every awkward kind of file."""

from __future__ import annotations

import numpy as np
import pytest

from images import AWKWARD_EXPECTED, photo, write_awkward_inputs
from segpipe.decode import DecodeError, DecodeLimits, decode_image

LIMITS = DecodeLimits(max_pixels=100_000_000, max_bytes=1 << 30)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    write_awkward_inputs(folder)
    return folder


@pytest.mark.parametrize("name", sorted(AWKWARD_EXPECTED))
def test_each_file_decodes_or_fails_readably(awkward, name):
    data = (awkward / name).read_bytes()
    if AWKWARD_EXPECTED[name] == "ok":
        rgb = decode_image(data, LIMITS)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.flags.c_contiguous and rgb.max() > 0
    else:
        with pytest.raises(DecodeError) as info:
            decode_image(data, LIMITS)
        assert len(str(info.value)) > 10


def test_exif_orientation_applied(awkward):
    rgb = decode_image((awkward / "exif_rotated.jpg").read_bytes(), LIMITS)
    assert rgb.shape == (150, 100, 3)  # stored 150 wide, displayed 100 wide


def test_16_bit_keeps_the_high_byte(awkward):
    rgb = decode_image((awkward / "gray16.png").read_bytes(), LIMITS)
    expected = photo("coffee", 0.25).mean(axis=2).astype(np.uint16)
    np.testing.assert_array_equal(rgb[:, :, 0], expected)
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all()


def test_rgba_drops_alpha_like_convert_rgb(awkward):
    rgb = decode_image((awkward / "rgba.png").read_bytes(), LIMITS)
    np.testing.assert_array_equal(rgb, photo("coffee", 0.25))


def test_animated_gif_uses_first_frame(awkward):
    rgb = decode_image((awkward / "animated.gif").read_bytes(), LIMITS)
    assert rgb.shape == (100, 150, 3)


def test_pixel_and_byte_limits(awkward):
    data = (awkward / "gray.png").read_bytes()
    with pytest.raises(DecodeError, match="15000 pixels, over max_image_pixels=14999"):
        decode_image(data, DecodeLimits(max_pixels=14_999, max_bytes=1 << 30))
    with pytest.raises(DecodeError, match="over max_image_bytes=10"):
        decode_image(data, DecodeLimits(max_pixels=100_000_000, max_bytes=10))

"""Test images: small real photos (scikit-image's samples) and a folder of awkward files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
    "motorcycle": lambda: data.stereo_motorcycle()[0],
}


def photo(name: str, scale: float = 0.5) -> np.ndarray:
    """An RGB sample photo, downscaled so that tests stay fast."""
    image = Image.fromarray(PHOTOS[name]())
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def write_photos(folder: Path, names=("astronaut", "chelsea", "coffee", "rocket"),
                 scale: float = 0.5) -> list[Path]:
    """Write sample photos as PNG (lossless, so tests can re-read identical pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        Image.fromarray(photo(name, scale)).save(path)
        paths.append(path)
    return paths


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG built chunk by chunk (to claim sizes no real encoder would write)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


#: file name → expected status, for ``write_awkward_inputs``.
AWKWARD_EXPECTED = {
    "empty.jpg": "error",
    "truncated.jpg": "error",
    "notes.png": "error",
    "huge_header.png": "error",
    "gray.png": "ok",
    "rgba.png": "ok",
    "palette.png": "ok",
    "gray16.png": "ok",
    "cmyk.jpg": "ok",
    "exif_rotated.jpg": "ok",
    "animated.gif": "ok",
    "UPPER CASE.JPEG": "ok",
    "sub folder/naïve café ü.jpg": "ok",
}


def gray16_of(base: np.ndarray) -> np.ndarray:
    """16-bit gray whose high byte is the 8-bit gray and whose low byte differs from it."""
    gray = base.mean(axis=2).astype(np.uint16)
    return (gray << 8) | (255 - gray)


def write_awkward_inputs(folder: Path) -> None:
    """Every kind of file the decode stage must survive, plus a non-image that is ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo("coffee", 0.25)                      # 100 x 150
    h, w = base.shape[:2]
    (folder / "empty.jpg").write_bytes(b"")
    full = _jpeg(base)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "huge_header.png").write_bytes(png_bytes(60000, 60000, 8, 2, b""))
    Image.fromarray(base).convert("L").save(folder / "gray.png")
    rgba = np.dstack([base, np.full((h, w), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(gray16_of(base)).save(folder / "gray16.png")
    Image.fromarray(base).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    (folder / "exif_rotated.jpg").write_bytes(_jpeg(base, exif=exif.tobytes()))
    frames = [Image.fromarray(np.roll(base, 10 * i, axis=1)) for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    (folder / "UPPER CASE.JPEG").write_bytes(full)
    (folder / "sub folder").mkdir(exist_ok=True)
    (folder / "sub folder" / "naïve café ü.jpg").write_bytes(full)
    (folder / "readme.txt").write_text("not an image: ignored\n")

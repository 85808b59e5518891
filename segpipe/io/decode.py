"""Decode image files into RGB pixels on CPU tasks; a file that does not decode becomes an error row.

``decode_image`` turns bytes into an ``H×W×3`` uint8 array the way a person expects to see the
picture: EXIF orientation applied, first frame of animated or multi-page files, grayscale,
palette, RGBA (alpha dropped, as ``Image.convert("RGB")`` does), 16-bit and CMYK images
converted to 8-bit RGB. ``decode_batch`` is the Ray Data stage around it; with ``decode:
predictor`` it leaves the JPEGs a device decoder gives the same pixels of undecoded, checked
against the same limits (``model.jpeg`` decodes them in the predictor).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from segpipe import schema
from segpipe.io import storage

#: Decoded pixels are copied out of Pillow this many bytes at a time (``_to_rgb_array``).
PIXEL_BAND_BYTES = 32 << 20


class DecodeError(Exception):
    """The file is not an image this job can read; the message is the row's ``error``."""


@dataclass(frozen=True)
class DecodeLimits:
    """Inputs over these limits are refused before they can exhaust memory."""

    max_pixels: int
    max_bytes: int


def pillow_open(fp: Any) -> Image.Image:
    """``PIL.Image.open`` as Pillow defines it, even in a process where a library replaced it.

    Importing Ultralytics replaces ``Image.open`` with a wrapper that, at the first file Pillow
    cannot identify, runs pip to install pi-heif: a network call in the middle of a run, and
    another error than Pillow's. Such a wrapper keeps Pillow's function (a module global or a
    closure cell), which is used instead; a replacement that keeps none is used as it is."""
    return _pillow_open_function(Image.open)(fp)


def _pillow_open_function(current: Callable) -> Callable:
    if getattr(current, "__module__", None) == Image.__name__:
        return current
    kept = [*getattr(current, "__globals__", {}).values(),
            *(cell.cell_contents for cell in getattr(current, "__closure__", None) or ())]
    return next((f for f in kept if callable(f) and getattr(f, "__name__", None) == "open"
                 and getattr(f, "__module__", None) == Image.__name__), current)


def decode_image(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Decode ``data`` into a C-contiguous ``H×W×3`` uint8 RGB array.

    Raises ``DecodeError`` with a readable reason for empty, truncated, oversized or
    non-image data.
    """
    pixels = _read_image(data, limits, keep_jpeg=False)
    assert isinstance(pixels, np.ndarray)
    return pixels


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG left undecoded for the predictor's device (``decode: predictor``): its size from
    the header, which Pillow read and checked against the limits."""

    height: int
    width: int


def decode_or_keep_jpeg(data: bytes, limits: DecodeLimits) -> np.ndarray | DeviceJpeg:
    """``decode_image``'s pixels, or ``DeviceJpeg`` for a JPEG a device decoder gives exactly
    these pixels of (``device_decodable``): its bytes then travel to the predictor as they are.
    The limits and their refusals are ``decode_image``'s."""
    return _read_image(data, limits, keep_jpeg=True)


def device_decodable(image: Image.Image) -> bool:
    """Whether a JPEG decoder's plain RGB output is this image as ``decode_image`` makes it: a
    JPEG (not a camera's multi-picture MPO) of three colour components (not grayscale or
    CMYK, which Pillow converts), that no EXIF orientation turns."""
    if image.format != "JPEG" or image.mode != "RGB":
        return False
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except Exception:   # a broken EXIF block: decoded on the CPU, where decode_image ignores it
        return False
    return orientation in (None, 1)


#: The EXIF tag that says how a camera held the picture (``ImageOps.exif_transpose``).
EXIF_ORIENTATION = 0x0112


def _read_image(data: bytes, limits: DecodeLimits, keep_jpeg: bool) -> np.ndarray | DeviceJpeg:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise DecodeError(f"file is {len(data)} bytes, over max_image_bytes={limits.max_bytes}")
    with pillow_pixel_limit(limits.max_pixels), warnings.catch_warnings():
        # Pillow warns about large images and odd palettes; the limits below decide instead.
        warnings.simplefilter("ignore")
        try:
            image = pillow_open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = found.group(1) if found else "too many"
            raise DecodeError(f"image has {pixels} pixels, over max_image_pixels="
                              f"{limits.max_pixels}") from None
        except UnidentifiedImageError:
            raise DecodeError("not a readable image: format not recognised") from None
        except Exception as exc:  # Pillow raises many types for unreadable data
            raise DecodeError(f"not a readable image: {_reason(exc)}") from None
        width, height = image.size
        if width * height > limits.max_pixels:
            raise DecodeError(f"image is {width}x{height} = {width * height} pixels, over "
                              f"max_image_pixels={limits.max_pixels}")
        if keep_jpeg and device_decodable(image):
            return DeviceJpeg(height, width)
        try:
            image.seek(0)  # first frame of animated GIF/WebP and multi-page TIFF
            image.load()
            image = _apply_exif_orientation(image)
            return _to_rgb_array(image)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"{image.format or 'image'} does not decode: {_reason(exc)}") from None


#: Pillow's decompression-bomb limit is a module global: one decode sets it at a time.
_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow refuses images over twice its ``MAX_IMAGE_PIXELS`` (a decompression-bomb guard,
    ~179 megapixels by default). A run's limit under that needs nothing (``decode_image``
    refuses images over it itself, with the reason) and Pillow's module-wide setting is left
    alone; only a higher limit (``--max-image-pixels`` raised for huge images) makes it
    Pillow's while decoding, under a lock, and puts Pillow's own back afterwards."""
    if Image.MAX_IMAGE_PIXELS is None or max_pixels < 2 * Image.MAX_IMAGE_PIXELS:
        yield
        return
    with _PILLOW_LIMIT:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, in place: without an orientation tag
    Pillow would otherwise return a full copy (measured: a 120-megapixel JPEG peaked at
    3.6× its RGB size in decode with the copy, see docs/huge-images.md)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:
        pass  # a broken EXIF block does not make the pixels unreadable
    return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to 8-bit RGB (16/32-bit integer and float modes rescaled)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image)
        if image.mode == "F":
            scale = 255.0 if float(np.nanmax(values, initial=0)) <= 1.0 else 1.0
            gray = np.clip(np.nan_to_num(values) * scale, 0, 255).astype(np.uint8)
        elif image.mode == "I" and int(values.max(initial=0)) <= 255:
            gray = np.clip(values, 0, 255).astype(np.uint8)
        else:  # 16-bit samples: keep the high byte, as Pillow does for 16-bit RGB
            gray = (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Pillow hands its pixels to NumPy through tobytes(), which holds twice the image's RGB
    # bytes at once; copying horizontal bands keeps that to one band (measured on a 120 MP
    # JPEG: decode peaked at 3.5x its RGB size in one piece, see docs/huge-images.md)
    width, height = image.size
    array = np.empty((height, width, 3), np.uint8)
    rows = max(1, PIXEL_BAND_BYTES // max(1, 3 * width))
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.uint8)
        if band.ndim != 3 or band.shape[2] != 3:
            raise DecodeError(f"unexpected pixel layout {band.shape} after conversion to RGB")
        array[top:top + band.shape[0]] = band
    return array


def _decode_row(fs, path: Optional[str], size: int, data: Optional[bytes],
                source_error: Optional[str], limits: DecodeLimits, keep_jpeg: bool
                ) -> tuple[np.ndarray | DeviceJpeg | None, Optional[bytes], Optional[str]]:
    """One source row's pixels (or ``DeviceJpeg`` and its bytes, with ``keep_jpeg``), or None
    and the reason: the reader's (``read: ...``) or the decoder's (``decode: ...``)."""
    if source_error is not None:   # the reader could not give this row's bytes
        return None, None, f"read: {source_error}"
    try:
        if size > limits.max_bytes:
            raise DecodeError(f"file is {size} bytes, over max_image_bytes={limits.max_bytes}")
        if data is None:
            if path is None:
                raise DecodeError("the row holds neither the image's bytes nor its path")
            try:
                data = storage.read_bytes(fs, path)
            except OSError as exc:
                raise DecodeError(f"cannot read file: {_reason(exc)}") from None
        if keep_jpeg:
            return decode_or_keep_jpeg(data, limits), data, None
        return decode_image(data, limits), None, None
    except DecodeError as exc:
        return None, None, f"decode: {exc}"


def decode_batch(batch: pa.Table, input_uri: str, limits: DecodeLimits,
                 jpeg_to_predictor: bool = False) -> pa.Table:
    """Ray Data stage: source rows → decoded rows, one output row per input row.

    Reads each file through its filesystem (or takes the bytes a reader already read) and
    decodes it; any failure, reading included,
    becomes that row's ``status="error"`` with the reason, so a bad file never fails the block.
    With ``jpeg_to_predictor`` (``decode: predictor``) a JPEG its device decodes exactly
    (``device_decodable``) is checked but not decoded: its bytes go on in ``schema.JPEG``
    and its pixels are empty.
    """
    fs, _ = storage.resolve(input_uri)
    widths, heights, statuses, errors, pixels, jpegs = [], [], [], [], [], []

    def column(name: str) -> list:
        return (batch.column(name).to_pylist() if name in batch.column_names
                else [None] * batch.num_rows)

    for path, size, data, source_error in zip(column("path"), column("size"), column("data"),
                                              column("source_error")):
        image, kept, error = _decode_row(fs, path, size, data, source_error, limits,
                                         jpeg_to_predictor)
        shape = (image.height, image.width) if isinstance(image, DeviceJpeg) else \
            image.shape[:2] if image is not None else (None, None)
        heights.append(shape[0])
        widths.append(shape[1])
        statuses.append(schema.STATUS_OK if image is not None else schema.STATUS_ERROR)
        errors.append(error)
        pixels.append(image if isinstance(image, np.ndarray) else None)
        jpegs.append(kept if isinstance(image, DeviceJpeg) else None)
    columns = {**schema.image_columns(batch, statuses, errors, widths, heights),
               schema.PIXELS: pixel_column(pixels)}
    if jpeg_to_predictor:
        columns[schema.JPEG] = pa.array(jpegs, pa.large_binary())
    return pa.table(columns)


def pixel_column(images: list[Optional[np.ndarray]]) -> pa.Array:
    """Decoded images (``None`` for failed rows) as one ``large_binary`` column of their
    ``H×W×3`` bytes. One image is wrapped without a copy, several are copied once into one
    buffer: a 400-megapixel image costs its 1.2 GB once here, not once per conversion."""
    sizes = np.array([a.nbytes if a is not None else 0 for a in images], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    present = [a.reshape(-1) for a in images if a is not None]
    data = (present[0] if len(present) == 1 else
            np.concatenate(present) if present else np.zeros(0, np.uint8))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def pixel_arrays(column: pa.ChunkedArray, heights: list, widths: list) -> list[np.ndarray]:
    """The inverse of ``pixel_column``: each row's pixels as a read-only ``H×W×3`` view of
    the column's buffer (no copy); empty arrays for rows without pixels."""
    out: list[np.ndarray] = []
    for chunk in column.chunks:
        chunk = chunk.cast(pa.large_binary())
        _, offsets_buffer, data_buffer = chunk.buffers()
        first = chunk.offset
        offsets = np.frombuffer(offsets_buffer, np.int64)[first:first + len(chunk) + 1]
        data = (np.frombuffer(data_buffer, np.uint8) if data_buffer is not None
                else np.zeros(0, np.uint8))
        for k in range(len(chunk)):
            h, w = heights[len(out)], widths[len(out)]
            flat = data[offsets[k]:offsets[k + 1]]
            out.append(flat.reshape(h, w, 3) if h and w and len(flat) == h * w * 3
                       else np.zeros((0, 0, 3), np.uint8))
    return out

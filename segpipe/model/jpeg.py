"""Decode the JPEGs a run sends undecoded (``decode: predictor``) on the predictor's device.

On a CUDA device torchvision's ``decode_jpeg`` decodes a batch's JPEGs at once with nvJPEG,
so neither the decode tasks' CPUs nor the object store carry their pixels (the JPEG's bytes
travel instead); on a CPU it is libjpeg-turbo, which gives Pillow's pixels bit for bit
(``tests/test_device_decode.py``). What reaches this module was checked by
``io.decode.decode_or_keep_jpeg``: a JPEG of three colour components, no EXIF turn, inside the
run's limits. A file the device's decoder refuses is decoded by Pillow here, on the host, so
the setting never costs an image. docs/exactness.md says what nvJPEG's pixels are against Pillow's.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from segpipe.io.decode import DecodeError, DecodeLimits, decode_image
from segpipe.model.devices import is_fatal_device_error

__all__ = ["decode_jpegs"]


def decode_jpegs(files: list[bytes], sizes: list[tuple[int, int]],
                 device: torch.device) -> list[torch.Tensor | np.ndarray | str]:
    """Each JPEG of ``files`` as ``H×W×3`` uint8 pixels of its header's ``(height, width)``
    from ``sizes``: a tensor on ``device``, or a host array where the device's decoder could
    not; or the reason it does not decode.

    The device's decoder takes them all at once. When it fails on the batch (it gives nothing
    back then) it takes them one at a time; a file it refuses (nvJPEG lacks arithmetic
    coding, for one; or the device has no room for the pixels) or decodes to another size is
    decoded by Pillow on the host as ``io.decode`` decodes it: so a file decodes here whenever
    it decodes with ``decode: cpu``, and one that does not gets Pillow's reason, the row's
    error with ``decode: cpu`` too. An error that leaves a CUDA device unusable is raised."""
    if not files:
        return []
    try:
        decoded: list[Optional[torch.Tensor]] = [*_decode(files, device)]
    except Exception as exc:  # noqa: BLE001 - narrowed down one file at a time below
        if is_fatal_device_error(exc):
            raise   # the device is lost, not the file: the predictor's actor ends
        if len(files) > 1:
            return [decode_jpegs([data], [size], device)[0] for data, size in zip(files, sizes)]
        decoded = [None]
    return [image.permute(1, 2, 0) if image is not None and _fits(image, size)
            else _decode_with_pillow(data, size)
            for image, data, size in zip(decoded, files, sizes)]


def _fits(image: torch.Tensor, size: tuple[int, int]) -> bool:
    return image.ndim == 3 and image.shape[0] == 3 and tuple(image.shape[1:]) == tuple(size)


def _decode_with_pillow(data: bytes, size: tuple[int, int]) -> np.ndarray | str:
    """``io.decode.decode_image``'s pixels, or its reason; limited to the header's size,
    which the decode task checked against the run's limits."""
    try:
        pixels = decode_image(data, DecodeLimits(max_pixels=max(1, size[0] * size[1]),
                                                 max_bytes=len(data)))
    except DecodeError as exc:
        return str(exc)
    if pixels.shape[:2] != tuple(size):
        return (f"decodes to {pixels.shape[1]}x{pixels.shape[0]}, not its header's "
                f"{size[1]}x{size[0]}")
    return pixels


def _decode(files: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders for TorchCodec's; and the bytes are
        # a read-only buffer, only ever read
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        encoded = [torch.from_numpy(np.frombuffer(data, np.uint8)) for data in files]
        if device.type == "cuda":
            # torchvision's CUDA decoder allocates its outputs on the caller's stream and
            # writes them from a stream of its own without waiting: memory that kernels still
            # queued on the caller's stream read can be overwritten (pytorch/vision#9606, not
            # merged; torchcodec#1634 fixed its copy). Nothing may be queued when it starts.
            torch.cuda.current_stream(device).synchronize()
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(decoded)

"""Label Studio's brush RLE: the mask format of its ``BrushLabels`` regions.

Label Studio stores a brush mask as the RGBA image of the mask (height × width × 4 bytes,
row-major, 255 where the mask is) packed by thi.ng's ``rle-pack``: a header of the value count
(32 bits), the word size less one (5 bits) and four run-length field sizes less one (4 bits
each), then per run a repeat flag, a 2-bit choice of length field, the length less one and the
value. Its web app decodes that (``@thi.ng/rle-pack``), as does label-studio-sdk's
``converter.brush.decode_rle``. ``brush_rle`` writes the same bytes as the sdk's
``mask2rle`` (word size 8, field sizes 3, 4, 8, 16; runs over 65,536 values cut in pieces of
65,536; a final byte of padding even when the bits end on a byte), compiled.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Bits of the four run-length fields, as Label Studio's own encoder chooses them.
RUN_FIELD_BITS = (3, 4, 8, 16)
WORD_BITS = 8
LONGEST_RUN = 1 << 16


def brush_rle(mask: np.ndarray) -> list[int]:
    """The Label Studio brush RLE (a list of byte values) of the boolean ``mask`` (H × W)."""
    return _brush_bytes(np.ascontiguousarray(mask, dtype=np.uint8).ravel()).tolist()


@njit(cache=True, nogil=True, inline="always")
def _put(out: np.ndarray, position: int, value: int, bits: int) -> int:
    """Write the ``bits`` low bits of ``value`` at bit ``position`` of ``out``, most
    significant first; return the next position."""
    for b in range(bits - 1, -1, -1):
        if (value >> b) & 1:
            out[position >> 3] |= np.uint8(0x80 >> (position & 7))
        position += 1
    return position


@njit(cache=True, nogil=True)
def _brush_bytes(flat: np.ndarray) -> np.ndarray:
    """The encoded bytes of a row-major mask (nonzero: in the mask), 4 values a pixel:
    header, then each run of equal pixels as repeats (runs are at least 4 values, so no
    literal is ever needed) in pieces of at most ``LONGEST_RUN``."""
    n = flat.size
    runs_bound = n + (4 * n) // LONGEST_RUN + 1
    out = np.zeros((57 + 27 * runs_bound) // 8 + 2, np.uint8)
    position = _put(out, 0, 4 * n, 32)
    position = _put(out, position, WORD_BITS - 1, 5)
    for bits in RUN_FIELD_BITS:
        position = _put(out, position, bits - 1, 4)
    i = 0
    while i < n:
        j = i + 1
        while j < n and (flat[j] != 0) == (flat[i] != 0):
            j += 1
        length = 4 * (j - i)
        colour = 255 if flat[i] != 0 else 0
        if length <= 256:
            choice = 0 if length <= 8 else 1 if length <= 16 else 2
            position = _put(out, position, 4 + choice, 3)
            position = _put(out, position, length - 1, RUN_FIELD_BITS[choice])
            position = _put(out, position, colour, WORD_BITS)
        else:
            while length > LONGEST_RUN:
                position = _put(out, position, 7, 3)
                position = _put(out, position, LONGEST_RUN - 1, 16)
                position = _put(out, position, colour, WORD_BITS)
                length -= LONGEST_RUN
            position = _put(out, position, 7, 3)
            position = _put(out, position, length - 1, 16)
            position = _put(out, position, colour, WORD_BITS)
        i = j
    position += 8 - position % 8   # Label Studio's encoder pads 1 to 8 zero bits
    return out[:position // 8]

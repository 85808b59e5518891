"""Label Studio's brush RLE: the mask format of its ``BrushLabels`` regions.

Label Studio stores a brush mask as the RGBA image of the mask (height × width × 4 bytes,
row-major, 255 where the mask is) packed by thi.ng's ``rle-pack``: a header of the value count
(32 bits), the word size less one (5 bits) and four run-length field sizes less one (4 bits
each), then per run a repeat flag, a 2-bit choice of length field, the length less one and the
value. Its web app decodes that (``@thi.ng/rle-pack``), as does label-studio-sdk's
``converter.brush.decode_rle``. ``brush_rle`` writes the same bytes as the sdk's
``mask2rle`` (word size 8, field sizes 3, 4, 8, 16; runs over 65,536 values cut in pieces of
65,536; a final byte of padding even when the bits end on a byte), vectorised.
"""

from __future__ import annotations

import numpy as np

#: Bits of the four run-length fields, as Label Studio's own encoder chooses them.
RUN_FIELD_BITS = (3, 4, 8, 16)
WORD_BITS = 8
LONGEST_RUN = 1 << 16


def brush_rle(mask: np.ndarray) -> list[int]:
    """The Label Studio brush RLE (a list of byte values) of the boolean ``mask`` (H × W)."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    count = flat.size * 4
    header = [(count, 32), (WORD_BITS - 1, 5), *((bits - 1, 4) for bits in RUN_FIELD_BITS)]
    values = np.array([v for v, _ in header], np.int64)
    widths = np.array([w for _, w in header], np.int64)
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate(([0], change))
        lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4   # 4 channels a pixel
        colour = np.where(flat[starts], 255, 0)
        run_values, run_widths = _run_fields(lengths, colour)
        values = np.concatenate((values, run_values))
        widths = np.concatenate((widths, run_widths))
    return _pack(values, widths)


def _run_fields(lengths: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (value, bits) fields of repeated runs: per piece a 3-bit code (repeat flag and the
    field choice), the length less one and the colour. Runs are at least 4 values long (a
    pixel is 4), so no run is ever written as a literal."""
    full = np.where(lengths > 256, (lengths - 1) // LONGEST_RUN, 0)   # pieces of 65,536 first
    last = lengths - full * LONGEST_RUN
    choice = np.select([last <= 8, last <= 16, last <= 256], [0, 1, 2], 3)
    choice[full > 0] = 3
    # every piece: the full ones of a run, then its last
    pieces = full + 1
    piece_run = np.repeat(np.arange(lengths.size), pieces)
    is_last = np.zeros(piece_run.size, bool)
    is_last[np.cumsum(pieces) - 1] = True
    piece_length = np.where(is_last, last[piece_run], LONGEST_RUN)
    piece_choice = np.where(is_last, choice[piece_run], 3)
    field_bits = np.asarray(RUN_FIELD_BITS)[piece_choice]
    values = np.stack([4 + piece_choice, piece_length - 1, colour[piece_run]], axis=1).ravel()
    widths = np.stack([np.full(piece_run.size, 3), field_bits,
                       np.full(piece_run.size, WORD_BITS)], axis=1).ravel()
    return values, widths


def _pack(values: np.ndarray, widths: np.ndarray) -> list[int]:
    """The fields written most significant bit first, then 1 to 8 zero bits, as bytes."""
    total = int(widths.sum())
    field = np.repeat(np.arange(values.size), widths)
    offset = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
    bits = ((values[field] >> (widths[field] - 1 - offset)) & 1).astype(np.uint8)
    padding = 8 - total % 8
    return np.packbits(np.concatenate((bits, np.zeros(padding, np.uint8)))).tolist()

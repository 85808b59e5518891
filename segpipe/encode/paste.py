"""Paste M×M soft masks into their boxes and return COCO RLE runs, in one compiled pass per image.

This is torchvision's ``paste_masks_in_image`` followed by ``> threshold`` and
``pycocotools.mask.encode``, bit for bit, without ever making a mask array:

* boxes are expanded as ``roi_heads.expand_boxes`` does (float32, on NumPy) and truncated to
  integers; each padded ``(M+2)×(M+2)`` mask is resized to its box with bilinear interpolation
  (``align_corners=False``) and binarised with ``>``;
* the interpolation reproduces the float32 arithmetic of torch's CPU kernel exactly, including
  where its compiled code fuses a multiply and an add (FMA). torch has two kernels for a
  one-channel 2-D resize: ``upsample_linear_channels_last`` when the output's height plus width
  is at most 128, the generic separable-order kernel otherwise (``aten/src/ATen/native/cpu/
  UpSampleKernel.cpp``, ``_use_channels_last_kernel_2d``). Both are reproduced below, and
  ``tests/test_encode.py`` checks every pixel against ``F.interpolate``;
* runs of the full ``H×W`` mask (column-major, as COCO's RLE counts them) are produced column
  by column of the box only. Where the four mask values around a stretch of pixels are all
  clearly above or all clearly below the threshold, the stretch is one run without looking at
  its pixels (each pixel is a convex combination of those four values, so float rounding
  cannot carry it across a margin of ``MARGIN``); only the stretches near the mask's outline
  are computed pixel by pixel.

``paste_runs`` returns the uncompressed counts of every detection of an image and their
areas; ``encode.py`` hands the counts to pycocotools, which compresses them to COCO's string.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

#: Pixels whose four surrounding mask values are all further than this from the threshold are
#: classified without computing them (float32 rounding moves a value by ~1e-7 at most).
MARGIN = np.float32(1e-6)
#: torch resizes with its channels-last kernel when output height + width <= this.
CHANNELS_LAST_MAX_SIDES = 128


@intrinsic
def _fma(typingctx, a, b, c):
    """float32 fused multiply-add (``llvm.fma.f32``): one rounding, as torch's compiled
    kernels get where the compiler contracts ``a * b + c``."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3))
        return builder.call(fn, args)

    return sig, codegen


def expand_boxes(boxes: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
    """torchvision's ``expand_masks`` scale and ``expand_boxes``, in float32 as torch computes
    them, truncated to integers as ``paste_masks_in_image`` does (``.to(torch.int64)``)."""
    scale = np.float32(float(mask_size + 2 * padding) / mask_size)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1)
    return expanded.astype(np.int64)   # truncation towards zero, like torch's


@njit(cache=True, nogil=True)
def _positions(in_size, out_size):
    """torch's ``compute_source_index_and_lambda`` for every output index: source rows (or
    columns) ``i0``, ``i1`` and weights ``l0``, ``l1`` (float32, the index computed with FMA)."""
    i0 = np.empty(out_size, np.int64)
    i1 = np.empty(out_size, np.int64)
    l0 = np.empty(out_size, np.float32)
    l1 = np.empty(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    for o in range(out_size):
        if out_size == in_size:
            i0[o] = o
            i1[o] = o
            l0[o] = np.float32(1.0)
            l1[o] = np.float32(0.0)
            continue
        real = _fma(scale, np.float32(o) + np.float32(0.5), np.float32(-0.5))
        if real < np.float32(0.0):
            real = np.float32(0.0)
        index = min(np.int64(np.floor(real)), in_size - 1)
        lam = real - np.float32(index)
        lam = min(max(lam, np.float32(0.0)), np.float32(1.0))
        i0[o] = index
        i1[o] = index + 1 if index < in_size - 1 else index
        l1[o] = lam
        l0[o] = np.float32(1.0) - lam
    return i0, i1, l0, l1


@njit(cache=True, nogil=True, inline="always")
def _inside(channels_last, a0, a1, b0, b1, la, lb, ka, kb, threshold):
    """Whether one pasted pixel is above the threshold: torch's value at row weights
    ``ka, kb`` and column weights ``la, lb`` between mask values ``a0 a1`` (upper row) and
    ``b0 b1`` (lower row); for the generic kernel ``a0``, ``b0`` are the rows already
    interpolated along the column."""
    if channels_last:
        value = _fma(a0, ka * la, a1 * (ka * lb))
        value = _fma(b0, kb * la, value)
        value = _fma(b1, kb * lb, value)
    else:
        value = _fma(a0, ka, b0 * kb)
    return value > threshold


@njit(cache=True, nogil=True)
def _one_mask(padded, bx0, by0, bx1, by1, cx0, cy0, cx1, cy1, height, threshold, runs):
    """One-runs ``[start, end)`` (column-major pixel indices of the full image, ``height``
    rows) of one mask pasted into box ``b`` and clipped to ``[cx0, cx1) × [cy0, cy1)``, as
    pairs in ``runs`` (grown when full); returns ``(runs, count)``."""
    w = max(bx1 - bx0 + 1, 1)
    h = max(by1 - by0 + 1, 1)
    x0, x1 = max(bx0, cx0), min(bx1 + 1, cx1)
    y0, y1 = max(by0, cy0), min(by1 + 1, cy1)
    count = 0
    if x1 <= x0 or y1 <= y0:
        return runs, count
    size = padded.shape[0]
    ry0, ry1, wy0, wy1 = _positions(size, h)
    rx0, rx1, wx0, wx1 = _positions(size, w)
    channels_last = h + w <= CHANNELS_LAST_MAX_SIDES
    hi_margin = threshold + MARGIN
    lo_margin = threshold - MARGIN
    zero = np.float32(0.0)
    # the most of each mask column: a pasted column whose two mask columns stay below the
    # threshold is all zeros
    column_max = np.empty(size, np.float32)
    for c in range(size):
        top = padded[0, c]
        for r in range(1, size):
            top = max(top, padded[r, c])
        column_max[c] = top
    # stretches of image rows that interpolate between the same two mask rows: [s_k, s_k+1)
    stretch = np.empty(size + 2, np.int64)
    stretches = 0
    for gy in range(y0, y1):
        if gy == y0 or ry0[gy - by0] != ry0[gy - 1 - by0]:
            stretch[stretches] = gy
            stretches += 1
    stretch[stretches] = y1
    column = np.empty(size, np.float32)   # generic kernel: the row interpolation at column x
    last_end = -1                           # end of the last run, to join touching runs
    for gx in range(x0, x1):
        x = gx - bx0
        ca, cb, la, lb = rx0[x], rx1[x], wx0[x], wx1[x]
        top = max(column_max[ca], column_max[cb])
        if top < lo_margin or top <= zero:
            continue
        if not channels_last:
            for r in range(size):
                column[r] = _fma(padded[r, ca], la, padded[r, cb] * lb)
        base = gx * height
        for k in range(stretches):
            gy, end = stretch[k], stretch[k + 1]
            ra, rb = ry0[gy - by0], ry1[gy - by0]
            if channels_last:
                a0, a1, b0, b1 = padded[ra, ca], padded[ra, cb], padded[rb, ca], padded[rb, cb]
                lo = min(min(a0, a1), min(b0, b1))
                hi = max(max(a0, a1), max(b0, b1))
            else:
                a0, b0 = column[ra], column[rb]
                a1, b1 = a0, b0
                lo, hi = min(a0, b0), max(a0, b0)
            if hi < lo_margin or hi <= zero:
                continue
            search = gy
            while True:
                if lo > hi_margin:  # the whole stretch is inside: one run
                    first, stop = gy, end
                else:               # near the outline: pixel by pixel, the next inside one...
                    first = end
                    for py in range(search, end):
                        if _inside(channels_last, a0, a1, b0, b1, la, lb, wy0[py - by0],
                                   wy1[py - by0], threshold):
                            first = py
                            break
                    if first == end:
                        break
                    stop = first + 1  # ...and the run from it
                    while stop < end and _inside(channels_last, a0, a1, b0, b1, la, lb,
                                                 wy0[stop - by0], wy1[stop - by0], threshold):
                        stop += 1
                start = base + first
                if start == last_end:                  # joins the last run
                    runs[2 * count - 1] = base + stop
                else:
                    if 2 * count + 2 > runs.shape[0]:
                        grown = np.empty(2 * runs.shape[0], np.int64)
                        grown[:2 * count] = runs[:2 * count]
                        runs = grown
                    runs[2 * count] = start
                    runs[2 * count + 1] = base + stop
                    count += 1
                last_end = base + stop
                if stop >= end or lo > hi_margin:
                    break
                search = stop + 1   # more runs in this stretch (noise masks, rounding)
    return runs, count


@njit(cache=True, nogil=True)
def _paste_all(soft_masks, boxes, clips, height, width, threshold):
    """Counts (uncompressed COCO RLE, starting with zeros) of every detection, concatenated,
    with each detection's ``[start, end)`` in them and its area; detection ``k`` is pasted
    into ``boxes[k]`` and clipped to ``clips[k]`` (x0 y0 x1 y1), all in image pixels."""
    n, m = soft_masks.shape[0], soft_masks.shape[1]
    padded = np.zeros((m + 2, m + 2), np.float32)
    total = np.int64(height) * np.int64(width)
    offsets = np.zeros(n + 1, np.int64)
    areas = np.zeros(n, np.int64)
    counts = np.empty(max(64, 8 * n), np.int64)
    used = 0
    runs = np.empty(256, np.int64)
    for k in range(n):
        padded[1:m + 1, 1:m + 1] = soft_masks[k]
        runs, count = _one_mask(padded, boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3],
                                clips[k, 0], clips[k, 1], clips[k, 2], clips[k, 3], height,
                                threshold, runs)
        need = used + 2 * count + 1
        if need > counts.shape[0]:
            grown = np.empty(max(need, 2 * counts.shape[0]), np.int64)
            grown[:used] = counts[:used]
            counts = grown
        position = 0
        area = 0
        for j in range(count):
            start, end = runs[2 * j], runs[2 * j + 1]
            counts[used] = start - position
            counts[used + 1] = end - start
            used += 2
            area += end - start
            position = end
        if position < total or count == 0:
            counts[used] = total - position
            used += 1
        offsets[k + 1] = used
        areas[k] = area
    return counts[:used], offsets, areas


def paste_runs(soft_masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
               threshold: float, windows: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, offsets, areas)`` of ``N`` detections: detection ``k``'s uncompressed COCO
    RLE counts are ``counts[offsets[k]:offsets[k + 1]]`` and its mask has ``areas[k]``
    pixels. ``soft_masks`` is ``float32[N, M, M]``, ``boxes`` ``float32[N, 4]`` (x1 y1 x2 y2
    in image pixels), binarised at ``> threshold``.

    With ``windows`` (``int[N, 4]``, x0 y0 x1 y1 in the image), box ``k`` is in the pixels of
    window ``k`` (a tile) and its mask is pasted as torchvision pastes it in that tile: the
    box expanded and truncated to integers in tile pixels, the mask clipped to the tile."""
    soft_masks = np.ascontiguousarray(soft_masks, np.float32)
    n = len(soft_masks)
    expanded = expand_boxes(boxes, soft_masks.shape[-1]) if n else np.zeros((0, 4), np.int64)
    if windows is None:
        clips = np.tile(np.array([0, 0, width, height], np.int64), (n, 1))
    else:
        clips = np.asarray(windows, np.int64).reshape(n, 4)
        expanded = expanded + clips[:, [0, 1, 0, 1]]
    return _paste_all(soft_masks, np.ascontiguousarray(expanded), np.ascontiguousarray(clips),
                      int(height), int(width), np.float32(threshold))

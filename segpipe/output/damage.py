"""What is read back from predictions/ is untrusted: the checks an image row and each of its
detections pass before an export, a drawing, a review or an evaluation uses them.

Anyone who can write a run folder can edit its Parquet files, and a file can be damaged. A
value segpipe never writes must not crash a command, make it spin or allocate without bound,
or reach a file people open. So:

* an ok image row (``mark_damaged_images``, Arrow compute over the image table) must carry a
  ``file_name`` that segpipe writes (``sources.UNSAFE_FILE_NAME_RE2`` finds none: relative,
  no ``..`` or empty segment, no control characters), a width and height of at least 1
  and at most ``config.MAX_PIXEL_LIMIT`` pixels together, and an image_id no earlier ok row
  holds (a COCO file holds each image once); otherwise it becomes an error row, ``DAMAGED``
  and why;
* a detection (``detection_codes``, Arrow and compiled code over a chunk of rows) must have a
  score in [0, 1], finite boxes, a segmentation of the image's size whose counts are a COCO
  RLE covering exactly its pixels (``_rle_ones``: pycocotools trusts counts and loops over
  them) with the area of that mask, soft masks of M×M values of the run's kind, all of one
  size in an image (families with masks over the image: a ``mask_grid`` crop of a grid and
  its values), tile windows inside the image, and the category name the run's table
  gives its id; otherwise the reader takes it out (``damaged_detections_removed``).

Both are counted and the first few (``NAMED``) named by the command that met them.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from segpipe import schema
from segpipe.config import MAX_PIXEL_LIMIT
from segpipe.model.categories import UNKNOWN_NAME
from segpipe.model.settings import RunSettings

#: The error of an image row that predictions/ holds damaged.
DAMAGED = "damaged in predictions/"
#: The largest side of a stored soft mask (R-CNN's are 28).
MAX_SOFT_MASK_SIDE = 2048
#: How many damaged images or detections a command names.
NAMED = 5


def mark_damaged_images(table: pa.Table) -> pa.Table:
    """The image table ``table`` with every damaged ok row made an error row (its error
    ``DAMAGED: why``)."""
    from segpipe.io.sources import UNSAFE_FILE_NAME_RE2

    if not table.num_rows:
        return table
    ok = pc.equal(table.column("status"), schema.STATUS_OK)
    bad_name = pc.match_substring_regex(table.column("file_name"), UNSAFE_FILE_NAME_RE2)
    width = table.column("width").cast(pa.int64())
    height = table.column("height").cast(pa.int64())
    bad_size = pc.fill_null(pc.or_kleene(pc.or_kleene(pc.less(width, 1), pc.less(height, 1)),
                                         pc.greater(pc.multiply(width, height), MAX_PIXEL_LIMIT)),
                            True)
    key = "image_id" if "image_id" in table.column_names else "file_name"
    repeated = pa.array(_repeated_images(table.column(key).to_numpy(zero_copy_only=False),
                                         ok.to_numpy(zero_copy_only=False)))
    damaged = pc.and_(ok, pc.or_(pc.or_(pc.fill_null(bad_name, True), bad_size), repeated))
    if not pc.any(damaged).as_py():
        return table
    why = pc.if_else(pc.fill_null(bad_name, True),
                     f"{DAMAGED}: its file_name is not a relative path segpipe writes",
                     pc.if_else(bad_size, f"{DAMAGED}: its width and height are not those of an image",
                                f"{DAMAGED}: an earlier row holds the same image (its file_name "
                                "and image_id): each image is written once"))
    status = pc.if_else(damaged, schema.STATUS_ERROR, table.column("status"))
    error = pc.if_else(damaged, why, table.column("error"))
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.set_column(table.schema.get_field_index("error"), "error", error)


def _repeated_images(ids: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Which ok rows hold an image (its image_id, or file_name) an earlier ok row holds (in
    table order)."""
    repeated = np.zeros(len(ids), bool)
    rows = np.flatnonzero(ok)
    later = np.ones(len(rows), bool)
    later[np.unique(ids[rows], return_index=True)[1]] = False
    repeated[rows[later]] = True
    return repeated


def damaged_image_notes(table: pa.Table) -> tuple[int, list[str]]:
    """How many image rows of ``table`` ``mark_damaged_images`` marked, and the first
    ``NAMED`` of them in words."""
    if not table.num_rows:
        return 0, []
    marked = table.filter(pc.starts_with(pc.fill_null(table.column("error"), ""), DAMAGED))
    first = marked.slice(0, NAMED)
    return marked.num_rows, [f"{name!r}: {error[len(DAMAGED) + 2:]}" for name, error in
                             zip(first.column("file_name").to_pylist(), first.column("error").to_pylist())]


@njit(cache=True, nogil=True)
def _rle_ones(counts: np.ndarray, pixels: int) -> int:
    """The pixels in the mask of a compressed COCO RLE ``counts`` (ASCII codes), decoded as
    pycocotools' ``rleFrString`` does; -1 unless its runs are valid and cover exactly
    ``pixels``."""
    n = counts.size
    p = 0
    m = 0
    total = 0
    ones = 0
    before2 = 0   # the run two places back (runs from the fourth on are stored as deltas)
    before1 = 0
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n or k > 6:
                return -1
            c = int(counts[p]) - 48
            if c < 0 or c > 63:
                return -1
            x |= (c & 0x1F) << (5 * k)
            more = (c & 0x20) != 0
            p += 1
            k += 1
            if not more and (c & 0x10) != 0:
                x |= -1 << (5 * k)
        if m > 2:
            x += before2
        if x < 0:
            return -1
        total += x
        if total > pixels:
            return -1
        if m % 2 == 1:
            ones += x
        before2 = before1
        before1 = x
        m += 1
    return ones if total == pixels else -1


def rle_ones(counts: object, pixels: int) -> int:
    """``_rle_ones`` of a ``counts`` string; -1 for anything else."""
    if not isinstance(counts, str):
        return -1
    try:
        data = counts.encode("ascii")
    except UnicodeEncodeError:
        return -1
    return int(_rle_ones(np.frombuffer(data, np.uint8), pixels))


#: Why a detection is damaged, by code (``detection_codes``; 0: intact), and the field of it
#: that a line naming it shows.
REASONS = (
    ("", ""),
    ("its score {} is not a number in [0, 1]", "score"),
    ("its bbox {} is not 4 finite numbers of a box", "bbox"),
    ("its box {} is not 4 finite numbers", "box"),
    ("its category name {} is not the run's name of its category id", "category_name"),
    ("its mask's size {} is not the image's", "size"),
    ("its mask's counts are not a COCO RLE of the image's pixels", ""),
    ("its area {} is not its mask's pixels", "area"),
    ("its soft mask is not M×M values of the run's kind", ""),
    ("its soft mask is not the size of the image's others (masks are re-pasted together)", ""),
    ("a tile part's window, box or soft mask is not one of the image", ""),
    ("its mask grid {} is not a crop of a grid, or its soft mask not that crop's values", "mask_grid"),
)


def _reason(code: int, values: pa.StructArray, k: int) -> str:
    """``REASONS[code]`` with the value it names, cut short."""
    text, name = REASONS[code]
    if not name:
        return text
    holder = values.field("segmentation") if name == "size" else values
    value = holder.field(name)[k].as_py() if holder[k].is_valid else None
    return text.format(repr(value)[:80])


#: The key of a row (``damaged_detections_removed``) that names its damaged detections.
DAMAGED_KEY = "damaged"
#: What stands in that list for a damaged detection past the first ``NAMED`` of a chunk: it
#: is counted, not named (a file of garbage costs no line per detection).
UNNAMED = ""


def _boxes(array: pa.Array) -> np.ndarray:
    """Whether each x1 y1 x2 y2 / x y w h list of ``array`` is 4 finite numbers (None: null)."""
    good = np.zeros(len(array), bool)
    present = np.asarray(array.is_valid())
    if present.any():
        values = np.asarray(pc.list_flatten(array).to_numpy(zero_copy_only=False), np.float64)
        good[present] = np.isfinite(values.reshape(-1, 4)).all(1)
    return good


@njit(cache=True, nogil=True)
def _counts_ones(data: np.ndarray, offsets: np.ndarray, pixels: np.ndarray,
                 present: np.ndarray) -> np.ndarray:
    """``_rle_ones`` of each string ``data[offsets[k]:offsets[k + 1]]`` that is ``present``."""
    out = np.full(pixels.size, -1, np.int64)
    for k in range(pixels.size):
        if present[k]:
            out[k] = _rle_ones(data[offsets[k]:offsets[k + 1]], pixels[k])
    return out


@njit(cache=True, nogil=True)
def _uneven_sides(parents: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """Per detection (in row order), whether its soft-mask side differs from the first side
    of its row's masks."""
    out = np.zeros(sides.size, np.bool_)
    row = -1
    first = 0
    for k in range(sides.size):
        if parents[k] != row:
            row = parents[k]
            first = 0
        if sides[k] > 0:
            if first == 0:
                first = sides[k]
            elif sides[k] != first:
                out[k] = True
    return out


def _strings(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and offsets of a string array (its slice)."""
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int32)[array.offset:array.offset + len(array) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data, offsets.astype(np.int64)


def _soft_sides(array: pa.Array, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """The side M of each stored soft mask of ``array`` (0 when null) and whether it is bad."""
    lengths = np.asarray(pc.fill_null(pc.binary_length(array), 0).to_numpy(), np.int64)
    values = lengths // itemsize
    sides = np.rint(np.sqrt(values)).astype(np.int64)
    bad = (lengths > 0) & ((lengths % itemsize != 0) | (sides * sides != values)
                           | (sides > MAX_SOFT_MASK_SIDE))
    return np.where(bad | (lengths == 0), 0, sides), bad | (np.asarray(array.is_valid()) & (lengths == 0))


def _bad_grid_crops(values: pa.StructArray, itemsize: int) -> np.ndarray:
    """Per detection of a family with masks over the image (``mask_grid``), whether its grid is
    not ``grid_h grid_w x0 y0 x1 y1`` of a crop (sides up to ``MAX_SOFT_MASK_SIDE``), or its
    stored soft mask not the crop's values of the run's kind; a detection without a mask has
    neither."""
    n = len(values)
    soft = values.field("soft_mask")
    lengths = np.asarray(pc.fill_null(pc.binary_length(soft), -1).to_numpy(), np.int64)
    if "mask_grid" not in values.type.names:
        return np.asarray(values.field("segmentation").is_valid()) & (lengths >= 0)
    grids = values.field("mask_grid")
    present = np.asarray(grids.is_valid())
    cells = np.zeros((n, 6), np.int64)
    if present.any():
        cells[present] = np.asarray(pc.fill_null(pc.list_flatten(grids), -1).to_numpy(),
                                    np.int64).reshape(-1, 6)
    gh, gw, x0, y0, x1, y1 = cells.T
    sane = (gh >= 1) & (gw >= 1) & (gh <= MAX_SOFT_MASK_SIDE) & (gw <= MAX_SOFT_MASK_SIDE) & \
        (x0 >= 0) & (x0 < x1) & (x1 <= gw) & (y0 >= 0) & (y0 < y1) & (y1 <= gh)
    fits = (lengths < 0) | (lengths == (x1 - x0) * (y1 - y0) * itemsize)
    has_mask = np.asarray(values.field("segmentation").is_valid())
    return np.where(present, ~(sane & fits), has_mask)


def detection_codes(table: pa.Table, settings: RunSettings) -> tuple[pa.ListArray, np.ndarray]:
    """The detections of ``table``'s rows (``width``, ``height``, ``detections``) as one list
    array, and per detection (flattened, in row order) why it is damaged: an index into
    ``REASONS``, 0 when intact (module docstring). Arrow and compiled code: no Python object
    per detection."""
    lists = table.column("detections").combine_chunks()
    if isinstance(lists, pa.ChunkedArray):   # no chunk at all
        lists = pa.array([], lists.type)
    values = lists.flatten()
    n = len(values)
    codes = np.zeros(n, np.uint8)
    if not n:
        return lists, codes
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(), np.int64)
    heights = np.asarray(pc.fill_null(table.column("height"), -1).to_numpy(), np.int64)[parents]
    widths = np.asarray(pc.fill_null(table.column("width"), -1).to_numpy(), np.int64)[parents]

    def mark(bad: np.ndarray, code: int) -> None:
        codes[(codes == 0) & bad] = code

    score = np.asarray(values.field("score").to_numpy(zero_copy_only=False), np.float64)
    mark(~((score >= 0.0) & (score <= 1.0)), 1)   # NaN and null fail both
    bbox_good = _boxes(values.field("bbox"))
    sizes = np.asarray(pc.list_flatten(values.field("bbox")).to_numpy(zero_copy_only=False), np.float64)
    if bbox_good.any():
        wh = np.zeros((n, 2))
        wh[np.asarray(values.field("bbox").is_valid())] = sizes.reshape(-1, 4)[:, 2:]
        bbox_good &= (wh >= 0).all(1)
    mark(~bbox_good, 2)
    box = values.field("box")
    mark(np.asarray(box.is_valid()) & ~_boxes(box), 3)
    categories = settings.categories.categories
    position = pc.index_in(values.field("category_id"), value_set=pa.array([c.id for c in categories], pa.int32()))
    expected = pc.fill_null(pc.take(pa.array([c.name for c in categories], pa.string()), position),
                            UNKNOWN_NAME)
    mark(~np.asarray(pc.fill_null(pc.equal(expected, values.field("category_name")), False)), 4)
    segmentation = values.field("segmentation")
    has_mask = np.asarray(segmentation.is_valid())
    if has_mask.any():
        size, counts = segmentation.flatten()
        size_ok = np.asarray(pc.fill_null(pc.equal(pc.list_value_length(size), 2), False))
        first = np.zeros(n, np.int64)
        second = np.zeros(n, np.int64)
        offsets = np.asarray(size.offsets)
        child = np.asarray(size.values.to_numpy(zero_copy_only=False), np.int64)
        at = np.flatnonzero(size_ok)
        first[at], second[at] = child[offsets[at]], child[offsets[at] + 1]
        mark(has_mask & ~(size_ok & (first == heights) & (second == widths)), 5)
        data, string_offsets = _strings(counts)
        check = has_mask & (codes == 0)
        ones = _counts_ones(data, string_offsets, heights * widths, check)
        mark(check & (ones < 0), 6)
        area = np.asarray(pc.fill_null(values.field("area"), -1).to_numpy(), np.int64)
        mark(check & (ones >= 0) & (area != ones), 7)
    itemsize = np.dtype(settings.soft_mask_dtype).itemsize
    if settings.model.mask_frame is not None:   # grid crops: no tiles, no common side
        mark(_bad_grid_crops(values, itemsize), 11)
        return lists, codes
    sides, bad_soft = _soft_sides(values.field("soft_mask"), itemsize)
    mark(bad_soft, 8)
    parts = values.field("parts")
    tiled = np.flatnonzero(np.asarray(parts.is_valid()) & (codes == 0))
    for k, part_list in zip(tiled, parts.take(pa.array(tiled)).to_pylist()):
        if _damaged_parts(part_list, int(heights[k]), int(widths[k]), itemsize):
            codes[k] = 10
        elif not sides[k] and part_list and part_list[0].get("soft_mask"):
            sides[k] = math.isqrt(len(part_list[0]["soft_mask"]) // itemsize)
    mark(_uneven_sides(parents, np.where(codes == 0, sides, 0)), 9)
    return lists, codes


def _damaged_parts(parts: list[dict], height: int, width: int, itemsize: int) -> bool:
    """Whether a tiled detection's ``parts`` hold a window outside the image, a box that is not
    4 finite numbers or a soft mask that is not M×M (tiled images: a handful a run)."""
    for part in parts:
        window, box, soft = part.get("window"), part.get("box"), part.get("soft_mask")
        if window is None or len(window) != 4 or box is None or len(box) != 4:
            return True
        x0, y0, x1, y1 = window
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height) or \
                not all(math.isfinite(v) for v in box):
            return True
        if soft is not None and (not soft or len(soft) % itemsize
                                 or math.isqrt(len(soft) // itemsize) ** 2 * itemsize != len(soft)):
            return True
    return False


def damaged_detections_removed(table: pa.Table, settings: RunSettings) -> tuple[pa.Table, list[list[str]]]:
    """``table`` (rows with ``file_name``, ``width``, ``height``, ``detections``) with every
    damaged detection (``detection_codes``) taken out of its row's list, and per row a line
    naming each one taken out (most rows: none; past the first ``NAMED``, ``UNNAMED``)."""
    lists, codes = detection_codes(table, settings)
    lines: list[list[str]] = [[] for _ in range(table.num_rows)]
    damaged = np.flatnonzero(codes)
    if not damaged.size:
        return table, lines
    offsets = np.asarray(lists.offsets, np.int64)
    starts = offsets - offsets[0]
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(), np.int64)
    names = table.column("file_name")
    values = lists.flatten()
    for n, k in enumerate(damaged):
        row = int(parents[k])
        lines[row].append(UNNAMED if n >= NAMED else f"{names[row].as_py()!r} detection "
                          f"{int(k - starts[row])}: {_reason(int(codes[k]), values, int(k))}")
    keep = codes == 0
    kept = np.zeros(table.num_rows + 1, np.int64)
    np.add.at(kept, parents[keep] + 1, 1)
    cleaned = pa.ListArray.from_arrays(pa.array(np.cumsum(kept), pa.int32()),
                                       values.filter(pa.array(keep)),
                                       mask=lists.is_null())
    index = table.schema.get_field_index("detections")
    return table.set_column(index, table.schema.field(index), cleaned), lines

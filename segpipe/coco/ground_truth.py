"""COCO ground truth for ``segpipe eval``: read one file or the shards an index lists, and check
every part pycocotools relies on before it sees them.

pycocotools trusts what it is given: an image that is not an object, an annotation without
``image_id`` or a category without ``id`` raise deep in its index, and a compressed RLE whose
counts do not add up to the image makes its C code loop over garbage for minutes. Here each is
a ``ConfigError`` in one line naming the file and the entry.
"""

from __future__ import annotations

import math
from typing import Any, Optional, TypeGuard

from segpipe.coco.shards import load_instances
from segpipe.config import MAX_PIXEL_LIMIT, ConfigError
from segpipe.output.damage import rle_ones


def load_ground_truth(path: str) -> dict[str, Any]:
    """The COCO instances dataset at ``path`` (a file, an index.json or its folder), checked
    (``ground_truth_problem``); ``ConfigError`` naming what is wrong."""
    try:
        data = load_instances(path)
    except RecursionError:
        raise ConfigError(f"ground truth {path} nests deeper than any COCO file") from None
    problem = ground_truth_problem(data)
    if problem:
        raise ConfigError(f"ground truth {path}: {problem}")
    return data


def _integer(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ground_truth_problem(data: Any) -> Optional[str]:
    """What makes ``data`` unusable as COCO instances ground truth, in words, or None."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        return "not a COCO instances file (lists of images, annotations and categories)"
    sizes: dict[int, tuple[int, int]] = {}
    for k, image in enumerate(data["images"]):
        where = f"images[{k}]"
        if not isinstance(image, dict):
            return f"{where} is not an object"
        if not _integer(image.get("id")) or not isinstance(image.get("file_name"), str):
            return f"{where} has no integer id or no file_name"
        width, height = image.get("width"), image.get("height")
        if not (_integer(width) and _integer(height) and width > 0 and height > 0
                and width * height <= MAX_PIXEL_LIMIT):
            return f"{where} ({image['file_name']!r}) has no width and height of an image"
        if image["id"] in sizes:
            return f"{where}: image id {image['id']} is used twice"
        sizes[image["id"]] = (height, width)
    categories: set[int] = set()
    for k, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _integer(category.get("id")):
            return f"categories[{k}] has no integer id"
        if not isinstance(category.get("name"), str) or not category["name"].strip():
            return f"categories[{k}] (id {category['id']}) has no name"
        if category["id"] in categories:
            return f"categories[{k}]: category id {category['id']} is used twice"
        categories.add(category["id"])
    annotations: set[int] = set()   # COCO indexes annotations by id: a repeat hides one
    for k, annotation in enumerate(data["annotations"]):
        problem = _annotation_problem(annotation, sizes, categories)
        if problem:
            return f"annotations[{k}] {problem}"
        if annotation["id"] in annotations:
            return f"annotations[{k}]: annotation id {annotation['id']} is used twice"
        annotations.add(annotation["id"])
    return None


def _annotation_problem(annotation: Any, sizes: dict[int, tuple[int, int]],
                        categories: set[int]) -> Optional[str]:
    if not isinstance(annotation, dict):
        return "is not an object"
    if not _integer(annotation.get("id")):
        return "has no integer id"
    if not _integer(annotation.get("image_id")) or annotation["image_id"] not in sizes:
        return f"(id {annotation['id']}): its image_id {annotation.get('image_id')!r} is no image of the file"
    if not _integer(annotation.get("category_id")) or annotation["category_id"] not in categories:
        return f"(id {annotation['id']}): its category_id {annotation.get('category_id')!r} is no category"
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        return f"(id {annotation['id']}): its bbox is not 4 finite numbers"
    area = annotation.get("area")
    if not (_number(area) and area >= 0):   # COCOeval reads every ground truth's area
        return f"(id {annotation['id']}): its area is not a finite number >= 0"
    if annotation.get("iscrowd", 0) not in (0, 1):
        return f"(id {annotation['id']}): its iscrowd {annotation['iscrowd']!r} is neither 0 nor 1"
    height, width = sizes[annotation["image_id"]]
    problem = segmentation_problem(annotation.get("segmentation"), height, width)
    return f"(id {annotation['id']}): {problem}" if problem else None


def segmentation_problem(segmentation: Any, height: int, width: int) -> Optional[str]:
    """Why ``segmentation`` is not a COCO segmentation of an image of ``height`` × ``width``
    (polygons, uncompressed or compressed RLE; absent for boxes), or None."""
    if segmentation is None:
        return None
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(_number(v) for v in polygon)):
                return "a polygon is not a list of at least 3 finite x, y pairs"
            # pycocotools rasterises a polygon's whole outline at 5x: far outside the image
            # its integers overflow (a crash) or its memory grows with the distance
            if not (all(-width <= x <= 2 * width for x in polygon[0::2]) and
                    all(-height <= y <= 2 * height for y in polygon[1::2])):
                return (f"a polygon has points far outside its {width}x{height} image "
                        "(more than the image's own size beyond an edge)")
        return None
    if not isinstance(segmentation, dict):
        return "its segmentation is neither polygons nor RLE"
    if segmentation.get("size") != [height, width]:
        return f"its RLE size {segmentation.get('size')!r} is not its image's [{height}, {width}]"
    counts = segmentation.get("counts")
    if isinstance(counts, list):
        if not all(_integer(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            return "its RLE counts are not runs covering its image"
        return None
    if rle_ones(counts, height * width) < 0:
        return "its RLE counts are not a COCO RLE of its image's pixels"
    return None

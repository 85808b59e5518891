"""The COCO category table: the one place that names category ids.

torchvision's COCO-trained detectors predict labels that already *are* COCO ``category_id``s
(1..90 with gaps where COCO 2014 dropped ten classes), so no remapping happens anywhere in
segpipe. ``tests/test_categories.py`` checks this table against torchvision's own label list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """One COCO category as it appears in a dataset's ``categories`` list."""

    id: int
    name: str
    supercategory: str


COCO_CATEGORIES: tuple[Category, ...] = tuple(
    Category(id_, name, supercategory)
    for id_, name, supercategory in [
        (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
        (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
        (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
        (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
        (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
        (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
        (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
        (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
        (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
        (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
        (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
        (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
        (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
        (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
        (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"),
        (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
        (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
        (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
        (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"),
        (61, "cake", "food"), (62, "chair", "furniture"), (63, "couch", "furniture"),
        (64, "potted plant", "furniture"), (65, "bed", "furniture"),
        (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
        (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
        (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
        (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
        (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
        (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
        (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
    ]
)

#: Number of classes a COCO-trained torchvision detector predicts (background + ids up to 90).
NUM_MODEL_CLASSES = 91

_NAME_BY_ID = {c.id: c.name for c in COCO_CATEGORIES}
COCO_CATEGORY_IDS = frozenset(_NAME_BY_ID)


def category_name(category_id: int) -> str:
    """Return the COCO name of ``category_id``; ids in COCO's gaps are named ``"N/A"``."""
    return _NAME_BY_ID.get(int(category_id), "N/A")


def coco_categories_json() -> list[dict]:
    """Return the ``categories`` list of a COCO dataset file."""
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in COCO_CATEGORIES]


def parse_classes(text: str) -> frozenset[int]:
    """COCO ids from a comma-separated list of names (any case) and/or ids: ``person,car,3``."""
    by_name = {c.name.lower(): c.id for c in COCO_CATEGORIES}
    ids = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.isdigit() and int(item) in _NAME_BY_ID:
            ids.add(int(item))
        elif item.lower() in by_name:
            ids.add(by_name[item.lower()])
        else:
            raise ValueError(f"unknown COCO class {item!r}; use names such as "
                             f"{', '.join(sorted(by_name)[:5])}... or ids 1..90")
    if not ids:
        raise ValueError("no class given")
    return frozenset(ids)

"""Category tables: which category each model label is. The one place that names category ids.

A run's ``CategoryTable`` maps the labels its model predicts to the categories every output
carries (predictions/, coco/, export, eval, render), and is recorded with the run's settings.

* torchvision's COCO-trained detectors (91 outputs) predict labels that already *are* COCO
  ``category_id``s (1..90 with gaps where COCO 2014 dropped ten classes): ``COCO_TABLE`` maps
  each label to itself, and a label in a gap is named ``"N/A"`` and belongs to no category.
  ``tests/test_categories.py`` checks this table against torchvision's own label list.
* A fine-tuned checkpoint with ``K`` outputs predicts labels ``1..K-1``; label ``k`` is the
  ``k``-th category of the user's categories file, in file order, with that file's id and name
  (``custom_table``). Without a file the categories are ``class_1`` .. ``class_{K-1}``.
* A model that names its classes (Ultralytics, Hugging Face): ``named_classes_table``.

This module imports neither torch nor Ray: the CLI reads categories files before starting them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

from segpipe.config import ConfigError
from segpipe.names import MAX_NAME_LENGTH, check_name, unsafe_character

UNKNOWN_NAME = "N/A"
BACKGROUND_NAMES = ("__background__", "background", "bg", "__bg__")


class CategoryError(ConfigError):
    """A categories file or a class list that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Category:
    """One category as it appears in a COCO dataset's ``categories`` list."""

    id: int
    name: str
    supercategory: str = ""


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


@dataclass(frozen=True)
class CategoryTable:
    """The categories of a run, and the model label that predicts each one.

    ``labels[i]`` is the model label of ``categories[i]``; ``num_classes`` is the number of
    outputs of the model's classifier (background included). ``origin`` says where the table
    came from: ``"coco"``, ``"file"`` (a categories file) or ``"generated"`` (``class_k``).
    """

    categories: tuple[Category, ...]
    labels: tuple[int, ...]
    num_classes: int
    origin: str
    _by_label: dict[int, Category] = field(init=False, repr=False, compare=False)
    _by_id: dict[int, Category] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_label = {label: c for label, c in zip(self.labels, self.categories)}
        object.__setattr__(self, "_by_label", by_label)
        object.__setattr__(self, "_by_id", {c.id: c for c in self.categories})

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(self._by_id)

    def for_label(self, label: int) -> Optional[Category]:
        """The category model label ``label`` predicts; ``None`` for a label with none."""
        return self._by_label.get(int(label))

    def category_of(self, label: int) -> tuple[int, str]:
        """``(category_id, name)`` stored for a detection of ``label``; a label without a
        category keeps its number as id and is named ``"N/A"`` (it never reaches coco/)."""
        category = self.for_label(label)
        return (category.id, category.name) if category else (int(label), UNKNOWN_NAME)

    def name_of(self, category_id: int) -> str:
        """The name stored with a detection of ``category_id``: its category's, ``"N/A"`` for
        an id of no category (``category_of``)."""
        category = self._by_id.get(category_id)
        return category.name if category else UNKNOWN_NAME

    def coco_json(self) -> list[dict]:
        """The ``categories`` list of a COCO dataset file, in table order."""
        return [{"id": c.id, "name": c.name, "supercategory": c.supercategory}
                for c in self.categories]

    def describe(self) -> str:
        names = ", ".join(c.name for c in self.categories[:4])
        more = ", ..." if len(self.categories) > 4 else ""
        return f"{len(self.categories)} {self.origin} categories ({names}{more})"

    def parse_classes(self, text: str) -> frozenset[int]:
        """Category ids from a comma-separated list of names (any case) and/or ids."""
        by_name = {c.name.lower(): c.id for c in self.categories}
        ids = set()
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if item.isdigit() and int(item) in self._by_id:
                ids.add(int(item))
            elif item.lower() in by_name:
                ids.add(by_name[item.lower()])
            else:
                examples = ", ".join(c.name for c in self.categories[:5])
                raise CategoryError(f"unknown class {item!r}: this run's classes are "
                                    f"{examples}{', ...' if len(by_name) > 5 else ''} "
                                    f"(names in any case, or their ids)")
        if not ids:
            raise CategoryError("no class given: name one or more of this run's classes "
                                "(names or ids, comma-separated)")
        return frozenset(ids)

    def to_json(self) -> dict:
        return {"origin": self.origin, "num_classes": self.num_classes,
                "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory,
                                "label": label} for c, label in zip(self.categories, self.labels)]}

    @classmethod
    def from_json(cls, value: Optional[dict]) -> "CategoryTable":
        """Inverse of ``to_json``; ``None`` (files written before tables were recorded) is COCO."""
        if not value:
            return COCO_TABLE
        try:
            rows = value["categories"]
            table = cls(tuple(Category(int(r["id"]), str(r["name"]), str(r.get("supercategory", "")))
                              for r in rows),
                        tuple(int(r["label"]) for r in rows), int(value["num_classes"]),
                        str(value["origin"]))
        except (KeyError, TypeError, ValueError):
            raise CategoryError("the category table recorded with the run is damaged") from None
        check_names(table.categories, "the category table recorded with the run")
        return table


COCO_TABLE = CategoryTable(COCO_CATEGORIES, tuple(c.id for c in COCO_CATEGORIES),
                           NUM_MODEL_CLASSES, "coco")


def custom_table(categories: Iterable[Category], num_classes: int) -> CategoryTable:
    """Label ``k`` (1-based) is the ``k``-th category; ``CategoryError`` unless there are
    exactly ``num_classes - 1`` of them."""
    categories = tuple(categories)
    if len(categories) != num_classes - 1:
        hint = ""
        if categories and categories[0].name.lower() in BACKGROUND_NAMES:
            hint = f"; leave out the background entry {categories[0].name!r}"
        raise CategoryError(
            f"the categories file names {len(categories)} categories, but the model has "
            f"{num_classes} classes (background + {num_classes - 1}): give exactly "
            f"{num_classes - 1} categories, label 1 first{hint}")
    return CategoryTable(categories, tuple(range(1, num_classes)), num_classes, "file")


def named_classes_table(names: dict[int, str],
                        categories: Optional[tuple[Category, ...]] = None) -> CategoryTable:
    """The table of a model that names its classes (Ultralytics' ``names``, a Hugging Face
    config's ``id2label``): class ``k`` is label ``k + 1``. The user's categories (one per
    class up to the highest) when given; else COCO's ids when the names are COCO's 80 (whether
    the classes count 0..79, as Ultralytics' and Mask2Former's, or use COCO's ids with ``N/A``
    in the gaps, as DETR's); else the model's own names with ids ``k + 1``."""
    classes = max(names) + 1 if names else 0
    if categories is not None:
        return custom_table(categories, classes + 1)
    named = {k: v for k, v in names.items() if v not in (UNKNOWN_NAME, "")}
    key_of = {name: k for k, name in sorted(named.items(), reverse=True)}
    if len(named) == len(COCO_CATEGORIES) and set(key_of) == {c.name for c in COCO_CATEGORIES}:
        labels = tuple(key_of[c.name] + 1 for c in COCO_CATEGORIES)
        return CategoryTable(COCO_CATEGORIES, labels, classes + 1, "coco")
    own = tuple(Category(k + 1, name) for k, name in sorted(named.items()))
    check_names(own, "the model's class names")
    return CategoryTable(own, tuple(c.id for c in own), classes + 1, "model")


def generated_table(num_classes: int) -> CategoryTable:
    """``class_1`` .. ``class_{K-1}`` with ids 1..K-1: a model whose classes nobody named."""
    categories = tuple(Category(k, f"class_{k}") for k in range(1, num_classes))
    return CategoryTable(categories, tuple(range(1, num_classes)), num_classes, "generated")


def table_for(num_classes: int, categories: Optional[tuple[Category, ...]]) -> CategoryTable:
    """The table of a model with ``num_classes`` outputs, given the user's categories (if any)."""
    if categories is not None:
        return custom_table(categories, num_classes)
    if num_classes == NUM_MODEL_CLASSES:
        return COCO_TABLE
    return generated_table(num_classes)


def unnamed_classes_warning(table: CategoryTable) -> Optional[str]:
    if table.origin != "generated":
        return None
    return (f"UNNAMED CLASSES: the model has {table.num_classes} classes and no --categories "
            f"file was given, so its {len(table.categories)} categories are named class_1 .. "
            f"class_{len(table.categories)} with ids 1..{len(table.categories)}; pass "
            "--categories FILE (a COCO JSON or one name per line) to name them")


#: The most classes a run may name (LVIS has 1,203, Objects365 365, Open Images 600), and the
#: largest categories file read: a model head grows with its classes, and a table of a
#: million names would cost gigabytes before any image is seen.
MAX_CATEGORIES = 10_000


MAX_CATEGORIES_BYTES = 4 << 20


def load_categories(uri: str) -> tuple[Category, ...]:
    """Read a categories file (a path or URI); ``CategoryError`` when it cannot be used."""
    from segpipe.io import storage

    fs, path = storage.resolve(uri)
    try:
        size = fs.get_file_info(path).size
        if size is not None and size > MAX_CATEGORIES_BYTES:
            raise CategoryError(f"categories file {uri} is {size} bytes, over the "
                                f"{MAX_CATEGORIES_BYTES} a table of {MAX_CATEGORIES} classes "
                                "needs; is it the right file?")
        data = storage.read_bytes(fs, path)
    except (OSError, FileNotFoundError) as exc:
        raise CategoryError(f"categories file {uri} cannot be read: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CategoryError(f"categories file {uri} is not UTF-8 text") from None
    return parse_categories(text, uri)


def parse_categories(text: str, source: str) -> tuple[Category, ...]:
    """Categories from a COCO JSON (a dataset with ``categories``, or a bare list of
    ``{"id", "name", "supercategory"?}``) or from a text file with one name per line (ids
    1..N in line order). ``source`` names the file in error messages."""
    stripped = text.lstrip("\ufeff").strip()
    if stripped[:1] in ("{", "["):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise CategoryError(f"categories file {source} is not valid JSON: {exc}") from None
        if isinstance(value, dict):
            if "categories" not in value:
                raise CategoryError(f"categories file {source} is a JSON object without a "
                                    "'categories' list (expected a COCO dataset file)")
            value = value["categories"]
        categories = _from_json_list(value, source)
    else:
        # lines end at line feeds only: a name holding another line end is refused, not cut
        names = [line.strip() for line in stripped.split("\n") if line.strip()]
        categories = tuple(Category(k, name) for k, name in enumerate(names, start=1))
    if not categories:
        raise CategoryError(f"categories file {source} names no category")
    if len(categories) > MAX_CATEGORIES:
        raise CategoryError(f"categories file {source} names {len(categories)} categories; "
                            f"segpipe takes at most {MAX_CATEGORIES}")
    _check_unique(categories, source)
    check_names(categories, f"categories file {source}")
    return categories


def check_names(categories: Iterable[Category], source: str) -> None:
    """``CategoryError`` for a class (or supercategory) name that holds a character no file
    segpipe writes may carry (``names.check_name``): a control character, a line separator,
    a lone surrogate..., or that is longer than ``names.MAX_NAME_LENGTH``."""
    for n, category in enumerate(categories):
        for what, name in (("name", category.name), ("supercategory", category.supercategory)):
            if unsafe_character(name) is not None or len(name) > MAX_NAME_LENGTH:
                raise CategoryError(check_name(name, f"{source}, entry {n}: the {what}"))


def _from_json_list(value, source: str) -> tuple[Category, ...]:
    if not isinstance(value, list):
        raise CategoryError(f"categories file {source}: 'categories' must be a list")
    categories = []
    for n, item in enumerate(value):
        where = f"categories file {source}, entry {n}"
        if not isinstance(item, dict):
            raise CategoryError(f"{where} is not an object with 'id' and 'name'")
        cid, name = item.get("id"), item.get("name")
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < 1 << 31:
            raise CategoryError(f"{where}: 'id' must be a non-negative integer below 2^31, "
                                f"got {str(cid)[:40]}")
        if not isinstance(name, str) or not name.strip():
            raise CategoryError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        supercategory = item.get("supercategory") or ""
        categories.append(Category(cid, name.strip(), str(supercategory)))
    return tuple(categories)


def _check_unique(categories: tuple[Category, ...], source: str) -> None:
    ids: dict[int, str] = {}
    names: dict[str, int] = {}
    for c in categories:
        if c.id in ids:
            raise CategoryError(f"categories file {source}: id {c.id} is used twice "
                                f"({ids[c.id]!r} and {c.name!r})")
        if c.name.lower() in names:
            raise CategoryError(f"categories file {source}: the name {c.name!r} appears twice")
        ids[c.id] = c.name
        names[c.name.lower()] = c.id

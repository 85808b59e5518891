"""The COCO category table agrees with torchvision's label list."""

import pytest
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from segpipe.model.categories import (
    COCO_CATEGORIES,
    COCO_TABLE,
    NUM_MODEL_CLASSES,
    Category,
    CategoryError,
)


def test_table_matches_torchvision_labels():
    labels = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert len(labels) == NUM_MODEL_CLASSES
    assert len(COCO_CATEGORIES) == 80
    for category in COCO_CATEGORIES:
        assert labels[category.id] == category.name
    gaps = [i for i, name in enumerate(labels) if name == "N/A"]
    assert gaps == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert all(COCO_TABLE.category_of(i) == (i, "N/A") for i in gaps)
    assert all(COCO_TABLE.for_label(c.id) == c for c in COCO_CATEGORIES)


def test_a_model_that_names_its_classes_gets_cocos_ids_or_its_own():
    from segpipe.model.categories import named_classes_table

    names = [c.name for c in COCO_CATEGORIES]
    # Ultralytics and Mask2Former count COCO's 80 classes 0..79: class 11 is COCO's id 13
    contiguous = named_classes_table(dict(enumerate(names)))
    assert contiguous.origin == "coco" and contiguous.num_classes == 81
    assert contiguous.category_of(12) == (13, "stop sign")
    assert contiguous.category_of(80) == (90, "toothbrush")
    # DETR keys them by COCO id, with N/A in the gaps
    keyed = {0: "N/A", **{c.id: c.name for c in COCO_CATEGORIES}, 12: "N/A"}
    table = named_classes_table(keyed)
    assert table.num_classes == 92 and table.category_of(14) == (13, "stop sign")
    assert table.for_label(13) is None    # the N/A class names no category
    own = named_classes_table({0: "crack", 1: "dent"})
    assert own.origin == "model" and own.category_of(2) == (2, "dent")
    with pytest.raises(CategoryError, match="the model has 3 classes"):
        named_classes_table({0: "crack", 1: "dent"}, (Category(7, "x"),))

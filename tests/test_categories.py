"""The COCO category table agrees with torchvision's label list."""

from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from segpipe.model.categories import COCO_CATEGORIES, COCO_TABLE, NUM_MODEL_CLASSES


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

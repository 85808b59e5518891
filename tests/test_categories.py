"""The COCO category table agrees with torchvision's label list."""

from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from segpipe.categories import COCO_CATEGORIES, NUM_MODEL_CLASSES, category_name


def test_table_matches_torchvision_labels():
    labels = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert len(labels) == NUM_MODEL_CLASSES
    assert len(COCO_CATEGORIES) == 80
    for category in COCO_CATEGORIES:
        assert labels[category.id] == category.name
    gaps = [i for i, name in enumerate(labels) if name == "N/A"]
    assert gaps == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert all(category_name(i) == "N/A" for i in gaps)

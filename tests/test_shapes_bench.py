"""The shapes dataset and the training script of the trained-model benchmarks (``bench/shapes.py``,
``bench/train_shapes.py``), at a tiny size: the full training runs as a benchmark, never here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bench import shapes, train_shapes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for split, count in (("train", 6), ("val", 2)):
        shapes.write_split(root, split, count, seed=5, width=160, height=120)
    return root


def test_ground_truth_is_exact_and_the_images_are_reproducible(dataset, tmp_path):
    coco = json.loads((dataset / "train" / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(shapes.CLASSES)
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert sum(len(v) for v in by_image.values()) >= 6
    for image in coco["images"]:
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in by_image[image["id"]]]
        stacked = np.stack(masks)
        assert stacked.shape[1:] == (image["height"], image["width"])
        assert stacked.sum(0).max() == 1, "visible parts of instances never overlap"
        for ann, mask in zip(by_image[image["id"]], masks):
            assert ann["area"] == mask.sum() >= shapes.MIN_VISIBLE_AREA
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
    again = shapes.make_image(5, "train", 3, 160, 120)   # alone, from its own seed
    stored = np.asarray(Image.open(dataset / "train" / "images" / "train_000003.png"))
    assert np.array_equal(again.pixels, stored)
    assert not np.array_equal(shapes.make_image(5, "val", 3, 160, 120).pixels, stored)


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_a_checkpoint_segpipe_loads(dataset, tmp_path):
    model, log = train_shapes.train(dataset, iterations=8, batch_size=2, min_size=96,
                                    max_size=128, lr=3e-4, seed=0, precision="fp32",
                                    log_every=2)
    losses = [entry["loss"] for entry in log]
    assert len(losses) == 4 and losses[-1] < losses[0]
    path, sha256 = train_shapes.save_checkpoint(model, tmp_path / "cache", log, {"tiny": True})
    assert path.name == f"maskrcnn-shapes-{sha256[:12]}.pt"
    from segpipe.model.categories import load_categories
    from segpipe.model.rcnn import resolve
    from segpipe.model.spec import ModelSpec
    from segpipe.model.weights import WeightsSource
    categories = load_categories(str(tmp_path / "cache" / "shapes-categories.json"))
    resolved = resolve(WeightsSource("file", str(path), path), ModelSpec(
        "maskrcnn_resnet50_fpn", 96, 128, 0.05, 0.5, 100, 1000), categories=categories)
    assert resolved.sha256 == sha256 and resolved.spec.num_classes == len(shapes.CLASSES) + 1

"""The batched post-processing (``model.batched_postprocess``) against torchvision's per-image code:
the same detections, bit for bit, in fp32 on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, nms

from bench.precision_stages import scale_to_trained_outputs
from images import photo
from segpipe.model import batched_postprocess
from segpipe.model.batched_postprocess import grouped_nms
from segpipe.model.build import build_model
from segpipe.model.inference import image_tensor, predict_images
from segpipe.model.spec import ModelSpec


def _random_boxes(generator: torch.Generator, n: int, extent: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * extent
    wh = torch.rand(n, 2, generator=generator) * extent / 4 + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_grouped_nms_keeps_what_torchvision_nms_keeps_in_every_group(threshold):
    generator = torch.Generator().manual_seed(int(threshold * 10))
    boxes = _random_boxes(generator, 3000)
    scores = torch.rand(3000, generator=generator)
    groups = torch.randint(0, 7, (3000,), generator=generator) * 3 + 1  # sparse group ids
    kept = grouped_nms(boxes, scores, groups, threshold)
    expected = torch.zeros(3000, dtype=torch.bool)
    for group in groups.unique():
        members = torch.nonzero(groups == group)[:, 0]
        expected[members[nms(boxes[members], scores[members], threshold)]] = True
    assert 0 < int(kept.sum()) < 3000
    assert torch.equal(kept, expected)


def _borderline_pairs(threshold: float, count: int, apart: float = 0.0) -> torch.Tensor:
    """``count`` pairs of boxes whose IoU lies a few float32 steps either side of
    ``threshold`` (the second box shifted so that IoU = (w - s) / (w + s)); pair ``k``
    starts at ``k * apart``."""
    pairs = []
    for k in range(count):
        left = k * apart
        width = 10.0 + k * 0.37
        shift = np.float32(width * (1 - threshold) / (1 + threshold))
        s = float(shift + np.float32(k % 5 - 2) * np.spacing(shift))
        pairs += [[left, 0.0, left + width, 10.0], [left + s, 0.0, left + s + width, 10.0]]
    return torch.tensor(pairs, dtype=torch.float32)


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_grouped_nms_decides_borderline_overlaps_as_torchvision_does(threshold):
    """Pairs whose IoU lies within a few float32 steps of the threshold, both sides; 0.3's
    float32 value is above 0.3, and the kernel compares in double."""
    boxes = _borderline_pairs(threshold, 1000)
    scores = torch.tensor([0.9, 0.8] * 1000)
    groups = torch.arange(1000).repeat_interleave(2)
    kept = grouped_nms(boxes, scores, groups, threshold)
    expected = torch.zeros(2000, dtype=torch.bool)
    for i in range(1000):
        expected[2 * i + nms(boxes[2 * i:2 * i + 2], scores[2 * i:2 * i + 2], threshold)] = True
    assert 0 < int((~expected).sum()) < 1000   # both outcomes occur
    assert torch.equal(kept, expected)


def test_equal_scores_are_taken_by_index():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10.]])
    kept = grouped_nms(boxes, torch.tensor([0.5, 0.5, 0.5]), torch.zeros(3, dtype=torch.long),
                       0.5)
    assert kept.tolist() == [True, False, False]


@pytest.mark.parametrize("count", [300, 2500])   # torchvision's coordinate trick, then not
def test_offsets_and_order_follow_torchvisions_batched_nms(count):
    """Three images of random boxes and borderline pairs in a high class, whose offset by
    torchvision's trick rounds some decisions the other way: followed either way."""
    generator = torch.Generator().manual_seed(count)
    per_image, pairs = [], 100
    for _ in range(3):
        boxes = torch.cat([_random_boxes(generator, count - 2 * pairs, extent=500.0),
                           _borderline_pairs(0.5, pairs, apart=60.0)])
        scores = torch.cat([torch.rand(count - 2 * pairs, generator=generator),
                            torch.tensor([0.9, 0.8] * pairs) - torch.arange(2 * pairs) * 1e-4])
        classes = torch.cat([torch.randint(1, 40, (count - 2 * pairs,), generator=generator),
                             torch.full((2 * pairs,), 39)])
        per_image.append((boxes, scores, classes))
    boxes, scores, classes = (torch.cat(parts) for parts in zip(*per_image))
    images = torch.arange(3).repeat_interleave(count)
    nms_boxes = batched_postprocess._nms_boxes(boxes, classes, images, 3)
    kept = grouped_nms(nms_boxes, scores, images * 40 + classes, 0.5)
    untricked = grouped_nms(boxes, scores, images * 40 + classes, 0.5)
    assert torch.equal(kept, untricked) == (count * 4 > 4000)   # the trick decides some
    for top in (10_000, 30):   # all kept; the first 30 (from the best candidates only)
        picks = batched_postprocess._kept_top(nms_boxes, scores, images * 40 + classes, images,
                                              3, 0.5, top)
        for pick, (b, s, c), start in zip(picks, per_image, (0, count, 2 * count)):
            assert torch.equal(pick - start, batched_nms(b, s, c, 0.5)[:top])


@pytest.fixture(scope="module")
def shared_model():
    """Seeded random weights, output layers scaled to a trained model's spread of logits
    (scores not near-tied, so NMS has real work); 300 proposals per level before the RPN's
    NMS and 300 after (torchvision's 1000 make the dense CPU NMS slow)."""
    spec = ModelSpec("maskrcnn_resnet50_fpn", 160, 256, 0.01, 0.5, 50, 300)
    torch.manual_seed(3)
    model = build_model(spec)
    model.rpn._pre_nms_top_n = {"training": 300, "testing": 300}
    scale_to_trained_outputs(model, image_tensor(photo("astronaut", 0.3), torch.device("cpu")))
    return model


@pytest.mark.parametrize("score_floor", [0.05, 0.01])
def test_a_batch_gives_torchvisions_detections_bit_for_bit(shared_model, score_floor):
    """Real photos of three sizes in one batch (two share a canvas), fp32: segpipe's
    predictor with the batched post-processing gives what it gives with torchvision's."""
    images = [image_tensor(photo(name, scale), torch.device("cpu"))
              for name, scale in (("astronaut", 0.3), ("coffee", 0.3), ("chelsea", 0.4),
                                  ("rocket", 0.25))]
    plain = copy.deepcopy(shared_model)
    plain.roi_heads.score_thresh = score_floor
    batched = batched_postprocess.install(copy.deepcopy(plain))
    expected = predict_images(plain, images)
    got = predict_images(batched, images)
    assert sum(len(d.scores) for d in expected) > 100   # up to 50 per image
    for want, have in zip(expected, got):
        for field in ("labels", "scores", "boxes", "soft_masks"):
            assert np.array_equal(getattr(want, field), getattr(have, field)), field

"""Tiled (sliced) inference: SAHI's windows and merge, exact full-resolution masks from tiles,
accounting per tile, and agreement with SAHI itself on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

import sahi_reference as ref
from conftest import CHECKPOINT_SEED, small_spec
from images import photo
from synthetic import blob_detections
from segpipe.config import ConfigError, SegmentConfig, tile_overlap_pixels, validate
from segpipe.model.detections import ImageDetections
from segpipe.encode.encoder import encode_detections, rethreshold
from segpipe.model.build import build_model
from segpipe.model.stage import PredictStage
from segpipe.model.settings import RunSettings
from segpipe.model.tiles import (
    TileSettings,
    View,
    greedy_merge,
    image_views,
    merge_views,
    tile_windows,
)


@pytest.mark.parametrize("height,width,size,ratio", [
    (800, 1100, 256, 0.2), (3000, 4000, 512, 0.2), (513, 512, 512, 0.25), (700, 300, 256, 0.0),
    (1000, 1000, 300, 0.5), (257, 1999, 128, 0.1)])
def test_tile_windows_are_sahis_slices(height, width, size, ratio):
    from sahi.slicing import get_slice_bboxes

    theirs = get_slice_bboxes(height, width, size, size, False, ratio, ratio)
    assert tile_windows(height, width, size, tile_overlap_pixels(size, ratio)) == \
        [tuple(b) for b in theirs]


def test_views_slice_only_images_larger_than_a_tile():
    tiling = TileSettings(256, 51)
    assert image_views(256, 200, tiling) == [View((0, 0, 200, 256), True)]
    views = image_views(300, 600, tiling)
    assert all(not v.resize and v.window[2] - v.window[0] == 256 for v in views)
    covered = np.zeros((300, 600), bool)
    for x0, y0, x1, y1 in (v.window for v in views):
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    full = image_views(300, 600, TileSettings(256, 51, full_pass=True))
    assert full[:-1] == views and full[-1] == View((0, 0, 600, 300), True)


@pytest.mark.parametrize("config,message", [
    ({"tile": 32}, "tile must be 0 (off) or at least 64"),
    ({"tile": 256, "tile_overlap": 256}, "must be less than the tile"),
    ({"tile": 256, "tile_overlap": 1.5}, "fraction in [0, 1) or whole pixels"),
    ({"tile": 256, "tile_merge_threshold": 0.0}, "tile_merge_threshold must be in (0, 1]"),
])
def test_tile_settings_are_checked_before_work(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        validate(SegmentConfig(input="in", output="out", **config))


def test_greedy_merge_is_sahis_greedy_nmm():
    from sahi.postprocess.combine import GreedyNMMPostprocess
    from sahi.prediction import ObjectPrediction

    rng = np.random.default_rng(3)
    n = 300
    xy = rng.uniform(0, 400, (n, 2))
    wh = np.exp(rng.uniform(np.log(5), np.log(120), (n, 2)))
    boxes = np.concatenate([xy, xy + wh], 1).round(2)
    scores = rng.uniform(0.05, 1, n).astype(np.float32)
    labels = rng.integers(1, 4, n).astype(np.int32)
    groups = greedy_merge(boxes, scores, labels, 0.5)
    merged = {}
    for g in np.unique(groups):
        parts = np.flatnonzero(groups == g)
        merged[g] = (int(labels[parts[0]]), float(scores[parts].max()),
                     tuple(np.concatenate([boxes[parts, :2].min(0), boxes[parts, 2:].max(0)])))
    predictions = [ObjectPrediction(bbox=boxes[k].tolist(), category_id=int(labels[k]),
                                    score=float(scores[k])) for k in range(n)]
    theirs = GreedyNMMPostprocess(match_threshold=0.5, match_metric="IOS",
                                  class_agnostic=False)(predictions)
    theirs = sorted((p.category.id, p.score.value, tuple(p.bbox.to_xyxy())) for p in theirs)
    assert 40 < len(theirs) < n - 40     # plenty merged, plenty not
    ours = sorted(merged.values())
    assert len(ours) == len(theirs)
    for (label, score, box), (label2, score2, box2) in zip(ours, theirs):
        assert label == label2 and score == pytest.approx(score2)
        assert np.allclose(box, box2)
    # the numbering follows the best score of each detection
    best = [scores[groups == g].max() for g in range(groups.max() + 1)]
    assert best == sorted(best, reverse=True)


def test_detections_one_view_kept_apart_are_never_merged():
    """A ring around a triangle of the same class in one tile stay two (the tile's model
    kept both); the same pair from two views is one object seen twice."""
    boxes = np.array([[10, 10, 110, 110], [40, 40, 70, 70], [12, 11, 109, 112.]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    labels = np.ones(3, np.int32)
    assert greedy_merge(boxes, scores, labels, 0.5).tolist() == [0, 0, 0]     # SAHI's merge
    one_tile = greedy_merge(boxes, scores, labels, 0.5, np.array([0, 0, 1]))
    assert one_tile.tolist() == [0, 1, 0]    # the third, from another tile, joins the first
    two_tiles = greedy_merge(boxes, scores, labels, 0.5, np.array([0, 1, 1]))
    assert two_tiles.tolist() == [0, 0, 1]   # one of view 1 joins; the other stays its own


def test_an_object_on_a_seam_is_one_detection_with_the_union_of_its_masks():
    """A blob seen whole by one tile and cut by the edge of the other: one detection whose
    box is the union and whose RLE is, pixel for pixel, the union of each part pasted by
    torchvision into its own tile."""
    height, width = 300, 500
    views = [View((0, 0, 256, 256), False), View((205, 0, 461, 256), False)]
    soft, _ = blob_detections(2, 600, 600, seed=5, smallest=30, largest=60)
    # part 0: the whole object in tile 0 (tile pixels); part 1: its left part cut by tile 1's
    # left edge (tile 1 pixels), and an unrelated detection of another class there
    boxes0 = np.array([[180.3, 40.7, 250.2, 120.9]], np.float32)
    boxes1 = np.array([[0.0, 41.2, 45.6, 119.8], [100.5, 100.5, 160.2, 150.7]], np.float32)
    results = [ImageDetections(np.array([3], np.int32), np.array([0.9], np.float32), boxes0,
                               soft[:1]),
               ImageDetections(np.array([3, 5], np.int32), np.array([0.8, 0.7], np.float32),
                               boxes1, np.concatenate([soft[1:], soft[:1]]))]
    merged = merge_views(views, results, TileSettings(256, 51))
    rows = encode_detections(merged, height, width, 0.5)
    assert [(r["category_id"], len(r["parts"])) for r in rows] == [(3, 2), (5, 1)]
    seam = rows[0]
    assert seam["score"] == pytest.approx(0.9)
    assert np.allclose(seam["box"], [180.3, 40.7, 250.6, 120.9], atol=1e-4)
    # the reference: torchvision's paste in each tile, placed in the image, OR-ed
    canvas = np.zeros((height, width), bool)
    for view, result, k in ((views[0], results[0], 0), (views[1], results[1], 0)):
        x0, y0, x1, y1 = view.window
        tile = paste_masks_in_image(torch.from_numpy(result.soft_masks[k:k + 1, None]),
                                    torch.from_numpy(result.boxes[k:k + 1]), (y1 - y0, x1 - x0))
        canvas[y0:y1, x0:x1] |= tile[0, 0].numpy() > 0.5
    expected = mask_utils.encode(np.asfortranarray(canvas.astype(np.uint8)))
    assert seam["segmentation"]["counts"] == expected["counts"].decode()
    assert seam["area"] == canvas.sum()
    # re-export from the stored parts gives the same mask (float32 storage: exact)
    stored = encode_detections(merged, height, width, 0.5, soft_mask_dtype="float32")
    assert [rle for _, rle in rethreshold(stored, height, width, 0.5, "float32")] == \
        [r["segmentation"] for r in rows]


def test_tiled_detections_are_parts_with_windows_and_groups():
    """One rule of what tiled means (``ImageDetections.tile_parts``): merged views give their
    parts' windows and groups; untiled detections give none; groups without windows are
    refused, not encoded as an untiled image."""
    soft, _ = blob_detections(2, 100, 100, seed=1, smallest=20, largest=40)
    boxes = np.array([[10, 10, 50, 50], [0, 10, 10, 50]], np.float32)   # 2nd: cut by its edge
    untiled = ImageDetections(np.array([1, 1], np.int32), np.array([0.9, 0.8], np.float32),
                              boxes, soft)
    assert untiled.tile_parts() is None and not untiled.tiled
    merged = merge_views([View((0, 0, 64, 64), False), View((40, 0, 104, 64), False)],
                         [ImageDetections(untiled.labels[:1], untiled.scores[:1], boxes[:1],
                                          soft[:1]),
                          ImageDetections(untiled.labels[1:], untiled.scores[1:], boxes[1:],
                                          soft[1:])], TileSettings(64, 24))
    windows, groups = merged.tile_parts()
    assert merged.tiled and windows.tolist() == [[0, 0, 64, 64], [40, 0, 104, 64]]
    assert groups.tolist() == [0, 0]     # one object seen by both views
    broken = ImageDetections(merged.labels, merged.scores, merged.boxes, merged.soft_masks,
                             groups=merged.groups)
    with pytest.raises(ValueError, match="window"):
        encode_detections(broken, 64, 104, 0.5)


def test_an_image_is_ok_only_when_all_its_tiles_are(monkeypatch, checkpoint):
    spec = small_spec()
    predictor = PredictStage(spec, torch.load(checkpoint, weights_only=True), False,
                                  tiling=TileSettings(128, 25), chunk=3)
    real = predictor._predict_isolated

    def one_tile_fails(items):   # the second view of every forward pass of several fails
        outcomes = real(items)
        return outcomes[:1] + ["RuntimeError: boom"] + outcomes[2:] if len(items) > 1 else outcomes

    monkeypatch.setattr(predictor, "_predict_isolated", one_tile_fails)
    image = photo("astronaut", 0.5)   # 256×256: 9 tiles of 128
    small = photo("chelsea", 0.2)     # fits one tile: predicted whole
    out = predictor(ref.decoded_rows([image, small]))
    statuses, errors = out.column("status").to_pylist(), out.column("error").to_pylist()
    assert statuses[0] == "error" and errors[0].startswith("predict: ") and \
        "3 of 9 views failed (tile at (103, 0, 231, 128): RuntimeError: boom)" in errors[0]
    assert statuses[1] == "ok"


def test_tiling_is_part_of_the_run_settings():
    spec = small_spec()
    untiled = RunSettings(spec, "0" * 64, 0.5, True)
    tiled = RunSettings(spec, "0" * 64, 0.5, True, tiles=TileSettings(512, 102))
    assert RunSettings.from_metadata(tiled.to_metadata()) == tiled
    assert any(d.startswith("tiles:") for d in tiled.differences(untiled))


def collage(height: int, width: int) -> np.ndarray:
    """The sample photos side by side, filling a ``height × width`` image."""
    image = np.zeros((height, width, 3), np.uint8)
    y = 0
    for row in (("astronaut", "chelsea"), ("coffee", "rocket")):
        x = 0
        for name in row:
            part = photo(name, 1.0)[:height - y, :width - x]
            image[y:y + part.shape[0], x:x + part.shape[1]] = part
            x += part.shape[1]
        y += 400 if y == 0 else 0
    return image


@pytest.mark.slow
def test_tiled_mask_detections_agree_with_sahi():
    """Mask R-CNN on an 1100×800 image in 256 px tiles (20), with SAHI's merge settings (seam
    joins off: SAHI has none): at least 0.95 of SAHI's detections matched. What differs is
    how SAHI holds detections before it merges them (a detection without a polygon dropped,
    a box replaced by its mask polygon's bounding box): segpipe's tile detections held that
    way and merged by segpipe's merge give SAHI's detections, every one."""
    image, tile, ratio = collage(800, 1100), 256, 0.2
    torch.manual_seed(CHECKPOINT_SEED)
    spec = small_spec()
    state = build_model(spec).state_dict()
    tiling = TileSettings(tile, tile_overlap_pixels(tile, ratio), join_seams=False)
    ours = ref.segpipe_tiled(spec, state, image, tiling)
    theirs = ref.sahi_sliced(spec, state, image, tiling, ratio)
    # SAHI cannot hold detections without a polygon; segpipe keeps them (sahi_reference)
    found = ref.agreement(theirs, [f for f in ours if ref.has_polygon(f)])
    print("masks", found.summary())
    assert len(theirs) > 100
    assert found.fraction >= 0.95
    assert np.median(found.traced_mask_ious) > 0.99
    same = ref.agreement(theirs, ref.segpipe_as_sahi_holds_it(spec, state, image, tiling))
    print("as SAHI holds them", same.summary())
    assert same.sahi == same.segpipe == same.matched
    assert np.median(same.box_ious) == 1.0 and np.median(same.mask_ious) == 1.0


@pytest.mark.slow
def test_tiled_box_detections_agree_with_sahi():
    image, tile, ratio = collage(640, 768), 256, 0.2
    torch.manual_seed(CHECKPOINT_SEED)
    spec = small_spec(arch="fasterrcnn_resnet50_fpn")
    state = build_model(spec).state_dict()
    tiling = TileSettings(tile, tile_overlap_pixels(tile, ratio), join_seams=False)
    ours = ref.segpipe_tiled(spec, state, image, tiling)
    found = ref.agreement(ref.sahi_sliced(spec, state, image, tiling, ratio), ours)
    print("boxes only", found.summary())
    assert found.sahi > 60 and found.sahi == found.segpipe == found.matched
    assert min(found.box_ious) > 0.99


def test_images_over_pillows_own_limit_decode_up_to_the_runs_limit(monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS whatever segpipe allows; the
    decoder lifts it to max_image_pixels while it decodes, refuses images over that with the
    reason, and leaves Pillow's own setting as it was."""
    import io

    from PIL import Image

    from segpipe.io.decode import DecodeError, DecodeLimits, decode_image

    data = io.BytesIO()
    Image.fromarray(photo("chelsea", 0.3)).save(data, "PNG")   # 135×90 = 12,150 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # a small "Pillow default"
    assert decode_image(data.getvalue(), DecodeLimits(20_000, 1 << 20)).shape == (90, 135, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(DecodeError, match="12150 pixels, over max_image_pixels=10000"):
        decode_image(data.getvalue(), DecodeLimits(10_000, 1 << 20))
    with pytest.raises(Image.DecompressionBombError):   # Pillow itself, outside segpipe
        Image.open(io.BytesIO(data.getvalue()))


def test_hundreds_of_merged_detections_keep_their_areas():
    """Every detection seen twice (two views of the same window): 300 merged detections of
    two identical parts each, whose masks and areas are the single parts' (pycocotools'
    area() of a list overflows past 255 masks; segpipe does not use it so)."""
    soft, _ = blob_detections(300, 900, 900, seed=2, smallest=30, largest=40)
    cells = np.stack(np.meshgrid(np.arange(20) * 45.0, np.arange(15) * 45.0), -1).reshape(-1, 2)
    boxes = np.concatenate([cells + 2.5, cells + 41.7], 1).astype(np.float32)  # apart
    labels = (np.arange(300) % 5 + 1).astype(np.int32)
    scores = np.linspace(0.99, 0.1, 300).astype(np.float32)
    one = ImageDetections(labels, scores, boxes, soft)
    merged = merge_views([View((0, 0, 900, 900), False)] * 2, [one, one], TileSettings(512, 0))
    rows = encode_detections(merged, 900, 900, 0.5)
    single = encode_detections(one, 900, 900, 0.5)
    assert len(rows) == 300 and all(len(r["parts"]) == 2 for r in rows)
    assert [(r["area"], r["segmentation"]) for r in rows] == \
        [(r["area"], r["segmentation"]) for r in single]


def test_pieces_of_an_object_larger_than_the_overlap_are_joined_at_the_seam():
    """An object cut by two tiles' edges, neither seeing it whole: its pieces overlap too
    little to merge by IOS (SAHI leaves them apart, even when a full pass finds the whole
    object, if a piece scores higher). Where both tiles see them their boxes agree, so the
    seam rule joins them; a detection of another object beside the seam is left alone."""
    views = [View((0, 0, 256, 256), False), View((205, 0, 461, 256), False)]
    soft, _ = blob_detections(4, 600, 600, seed=7, smallest=30, largest=60)
    left = np.array([[120.0, 50.0, 256.0, 120.0],      # in tile 0, cut by its right edge
                     [150.0, 180.0, 256.0, 200.0]], np.float32)   # another object, cut too
    right = np.array([[0.0, 52.0, 140.0, 118.0],       # in tile 1, cut by its left edge
                      [0.0, 140.0, 90.0, 170.0]], np.float32)     # not the same in the band
    whole = np.array([[118.0, 49.0, 347.0, 121.0]], np.float32)  # full pass, image pixels

    def found(boxes, first, scores):
        return ImageDetections(np.full(len(boxes), 7, np.int32), np.array(scores, np.float32),
                               boxes, soft[first:first + len(boxes)])

    tiles = [found(left, 0, [0.8, 0.75]), found(right, 2, [0.7, 0.65])]
    as_sahi = TileSettings(256, 51, join_seams=False)
    assert len(set(merge_views(views, tiles, as_sahi).groups.tolist())) == 4
    with_full = merge_views(views + [View((0, 0, 461, 256), True)],
                            tiles + [found(whole, 0, [0.6])],
                            TileSettings(256, 51, full_pass=True, join_seams=False))
    assert len(set(with_full.groups.tolist())) == 4   # the first piece took the whole only
    joined = merge_views(views, tiles, TileSettings(256, 51))
    assert joined.groups.tolist() == [0, 0, 1, 2]
    rows = encode_detections(joined, 256, 461, 0.5)
    assert [len(r["parts"]) for r in rows] == [2, 1, 1]
    assert rows[0]["score"] == pytest.approx(0.8)
    assert np.allclose(rows[0]["box"], [120.0, 50.0, 345.0, 120.0])

"""Unit tests without Ray: export's selection of detections, eval's matching of categories,
images and crowd regions, on hand-made rows whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe.model.categories import (
    COCO_TABLE,
    Category,
    CategoryError,
    custom_table,
    generated_table,
    table_for,
    unnamed_classes_warning,
)
from segpipe.config import ConfigError
from segpipe.coco.evaluate import crowd_regions, match_categories, match_images
from segpipe.annotations.selection import (
    ExportCounts,
    ExportOptions,
    box_area,
    mask_boxes_and_areas,
    select_detections,
)
from segpipe.coco.writer import coco_result
from segpipe.model.settings import RunSettings
from synthetic import SETTINGS, box_detection, image_row, write_predictions

H = W = 50


def row_of(*detections: dict) -> dict:
    return image_row("a.png", W, H, list(detections))


def det(category_id: int, score: float, x: int = 1, y: int = 1, w: int = 5, h: int = 5) -> dict:
    return box_detection(category_id, score, x, y, w, h, H, W)


def select(row: dict, settings: RunSettings = SETTINGS, **options) -> tuple[list[dict], ExportCounts]:
    counts = ExportCounts()
    options.setdefault("score_threshold", 0.5)
    kept = select_detections(row, ExportOptions(**options), settings, counts)
    return kept, counts


def test_score_threshold_keeps_equal_scores_and_counts_the_rest():
    kept, counts = select(row_of(det(1, 0.5), det(1, 0.49), det(1, 0.9)))
    assert [d["score"] for d in kept] == [0.5, 0.9]
    assert (counts.detections, counts.below_threshold) == (3, 1)


def test_classes_then_unknown_categories_are_left_out_in_that_order():
    kept, counts = select(row_of(det(1, 0.9), det(3, 0.9), det(12, 0.9)), classes=frozenset({1, 12}))
    assert [d["category_id"] for d in kept] == [1]
    assert counts.other_classes_left_out == 1 and counts.unknown_category_left_out == 1


def test_empty_and_small_masks():
    empty = {**det(1, 0.9), "area": 0}
    kept, counts = select(row_of(empty, det(1, 0.8, w=2, h=2), det(1, 0.7, w=3, h=3)), min_area=9)
    assert [d["area"] for d in kept] == [9]
    assert counts.empty_masks_left_out == 1 and counts.small_masks_left_out == 1


def test_max_per_image_keeps_the_highest_scores():
    row = row_of(det(1, 0.6), det(1, 0.95), det(1, 0.7), det(1, 0.8))
    kept, counts = select(row, max_per_image=2)
    assert sorted(d["score"] for d in kept) == [0.8, 0.95]
    assert counts.over_max_per_image == 2
    kept, counts = select(row, max_per_image=4)
    assert len(kept) == 4 and counts.over_max_per_image == 0


def test_box_only_detections_get_the_box_area():
    box_only = {**det(1, 0.9, w=4, h=7), "segmentation": None, "area": None, "soft_mask": None}
    kept, _ = select(row_of(box_only), min_area=28)
    assert kept[0]["area"] == 28.0 == box_area(box_only["bbox"])
    assert "segmentation" not in coco_result(7, kept[0])
    kept, counts = select(row_of(box_only), min_area=29)
    assert kept == [] and counts.small_masks_left_out == 1


def test_polygons_replace_the_rle_and_count_holes():
    ring = np.zeros((H, W), np.uint8)
    ring[5:20, 5:20] = 1
    ring[10:12, 10:12] = 0
    rle = mask_utils.encode(np.asfortranarray(ring))
    holed = {**det(1, 0.9), "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
             "area": int(ring.sum())}
    kept, counts = select(row_of(holed, det(1, 0.8)), polygons=True)
    assert all(isinstance(d["segmentation"], list) for d in kept)
    assert counts.masks_with_holes == 1 and counts.no_polygon_left_out == 0
    (box, area), (rle_box, rle_area) = mask_boxes_and_areas([kept[0], holed], H, W)
    assert (box, area) == ([5.0, 5.0, 15.0, 15.0], int(ring.sum()))
    assert (rle_box, rle_area) == (box, area)   # the same mask as RLE: the same box and area


def test_custom_tables_decide_what_is_a_category():
    table = custom_table((Category(7, "cat"), Category(3, "cup")), 3)
    settings = RunSettings(SETTINGS.model, SETTINGS.weights_sha256, 0.5, True, table)
    kept, counts = select(row_of(det(7, 0.9), det(3, 0.9), det(1, 0.9)), settings)
    assert [d["category_id"] for d in kept] == [7, 3] and counts.unknown_category_left_out == 1
    assert table.parse_classes("CAT, 3") == frozenset({7, 3})
    with pytest.raises(CategoryError, match="unknown class 'person'"):
        table.parse_classes("person")
    with pytest.raises(CategoryError, match="no class given"):
        table.parse_classes(" , ")


def test_category_tables_by_class_count():
    assert table_for(91, None) is COCO_TABLE and unnamed_classes_warning(COCO_TABLE) is None
    generated = table_for(4, None)
    assert generated == generated_table(4) and generated.origin == "generated"
    assert [(c.id, c.name) for c in generated.categories] == [(1, "class_1"), (2, "class_2"),
                                                              (3, "class_3")]
    assert "UNNAMED CLASSES" in unnamed_classes_warning(generated)
    named = table_for(3, (Category(9, "a"), Category(4, "b")))
    assert (named.labels, named.origin, named.num_classes) == ((1, 2), "file", 3)
    assert named.category_of(2) == (4, "b") and named.category_of(3) == (3, "N/A")
    assert named.coco_json() == [{"id": 9, "name": "a", "supercategory": ""},
                                 {"id": 4, "name": "b", "supercategory": ""}]
    assert type(named).from_json(named.to_json()) == named
    assert type(named).from_json(None) is COCO_TABLE
    with pytest.raises(CategoryError, match="names 1 categories, but the model has 3 classes"):
        table_for(3, (Category(9, "a"),))
    assert named.describe() == "2 file categories (a, b)"


def test_run_settings_round_trip_and_list_what_differs():
    table = custom_table((Category(7, "cat"),), 2)
    settings = RunSettings(SETTINGS.model, "f" * 64, 0.4, False, table)
    assert RunSettings.from_metadata(settings.to_metadata()) == settings
    assert settings.differences(settings) == []
    found = settings.differences(SETTINGS)
    assert "mask_threshold: 0.5 then, 0.4 now" in found
    assert "soft_masks: True then, False now" in found
    assert any(d.startswith("categories: 80 coco categories") for d in found)
    assert RunSettings.from_metadata({}) is None


# --- eval: matching ---

def coco_categories(**renumber) -> list[dict]:
    return [{"id": renumber.get(c.name, c.id), "name": c.name} for c in COCO_TABLE.categories]


def test_categories_match_by_id_when_they_agree():
    match = match_categories(coco_categories(), COCO_TABLE)
    assert match.how == "by id" and match.to_gt[18] == 18 and match.message is None


def test_categories_match_by_name_when_the_ids_differ():
    gt = [{"id": 100 + n, "name": c.name.upper()} for n, c in enumerate(COCO_TABLE.categories)]
    match = match_categories(gt, COCO_TABLE)
    assert match.how == "by name" and match.to_gt[1] == 100 and match.to_gt[90] == 179
    assert "80 contiguous ids?" in match.message and "'person' is 100 there, 1 in this run" \
        in match.message


def test_categories_that_cannot_match_are_refused():
    with pytest.raises(ConfigError, match="80 contiguous category ids"):
        match_categories([{"id": i, "name": f"c{i}"} for i in range(1, 81)], COCO_TABLE)
    with pytest.raises(ConfigError, match=r"\['unicorn'\] are not among"):
        match_categories([{"id": 1, "name": "person"}, {"id": 2, "name": "unicorn"}], COCO_TABLE)
    table = custom_table((Category(7, "cat"),), 2)
    gt = match_categories([{"id": 1, "name": "Cat"}], table)
    assert gt.how == "by name" and gt.to_gt == {7: 1} and "contiguous" not in gt.message


def test_images_match_by_name_then_by_a_unique_base_name(tmp_path):
    rows = [image_row("x/a.png", 10, 20, []), image_row("y/b.png", 10, 20, []),
            image_row("z/b.png", 10, 20, []), image_row("c.png", 10, 20, []),
            {**image_row("bad.png", 10, 20, []), "status": "error", "error": "decode: no",
             "width": None, "height": None, "detections": None}]
    write_predictions(tmp_path / "out", rows)
    gt = [{"id": 1, "file_name": "x/a.png", "width": 10, "height": 20},
          {"id": 2, "file_name": "a.png", "width": 10, "height": 20},
          {"id": 3, "file_name": "b.png", "width": 10, "height": 20},
          {"id": 4, "file_name": "c.png", "width": 11, "height": 20},
          {"id": 5, "file_name": "bad.png", "width": 10, "height": 20},
          {"id": 6, "file_name": "nowhere.png", "width": 10, "height": 20}]
    match = match_images(gt, str(tmp_path / "out" / "predictions"))
    ids = {r["file_name"]: r["image_id"] for r in rows}
    assert match.pred_by_gt == {1: ids["x/a.png"], 2: ids["x/a.png"]}
    assert match.not_predicted == ["b.png", "nowhere.png"]   # b.png is ambiguous: two folders
    assert match.failed == ["bad.png: decode: no"]
    assert match.size_mismatch == ["c.png: ground truth 11x20, predicted 10x20"]


def test_crowd_regions():
    def gt(*crowd):
        return {"annotations": [{"id": i, "iscrowd": c} for i, c in enumerate(crowd)]}

    assert crowd_regions(gt(0, 0), False) is None
    assert crowd_regions(gt(1, 0), False) is None          # some crowd: COCO's own semantics
    assert "all 2 ground-truth annotations are iscrowd=1" in crowd_regions(gt(1, 1), False)
    mixed = gt(1, 0, 1)
    assert "2 ground-truth annotations" in crowd_regions(mixed, True)
    assert [a["iscrowd"] for a in mixed["annotations"]] == [0, 0, 0]
    assert crowd_regions(gt(), False) is None


def test_each_reason_counts_every_detection_it_leaves_out():
    empty = {**det(1, 0.9), "area": 0}
    row = row_of(det(1, 0.1), det(1, 0.2), det(3, 0.9), det(4, 0.9), det(12, 0.9), det(26, 0.9),
                 empty, empty, det(1, 0.9, w=1, h=1), det(1, 0.9, w=1, h=2),
                 det(1, 0.7), det(1, 0.8), det(1, 0.95))
    kept, counts = select(row, classes=frozenset({1, 12, 26}), min_area=3, max_per_image=1)
    assert [d["score"] for d in kept] == [0.95]
    assert (counts.below_threshold, counts.other_classes_left_out,
            counts.unknown_category_left_out, counts.empty_masks_left_out,
            counts.small_masks_left_out, counts.over_max_per_image) == (2, 2, 2, 2, 2, 2)
    assert counts.detections == 13 and len(kept) + sum(n for n, _ in counts.left_out()) == 13


def test_a_detection_after_one_left_out_is_still_considered():
    kept, _ = select(row_of(det(12, 0.9), det(1, 0.9), {**det(1, 0.9), "area": 0}, det(2, 0.8)))
    assert [d["category_id"] for d in kept] == [1, 2]
    assert all("segmentation" in d and d["segmentation"]["counts"] for d in kept)


def test_coco_results_have_exactly_cocos_keys():
    masked = det(1, 0.9)
    assert coco_result(7, masked) == {"image_id": 7, "category_id": 1, "bbox": masked["bbox"],
                                      "score": 0.9, "segmentation": masked["segmentation"]}
    box_only = {**masked, "segmentation": None}
    assert coco_result(7, box_only) == {"image_id": 7, "category_id": 1,
                                        "bbox": masked["bbox"], "score": 0.9}


def test_class_lists_skip_empty_items_and_name_examples():
    assert COCO_TABLE.parse_classes("person,,car, ") == frozenset({1, 3})
    with pytest.raises(CategoryError) as info:
        COCO_TABLE.parse_classes("-1")
    assert "this run's classes are person, bicycle, car, motorcycle, airplane, ... " in str(info.value)
    small = custom_table(tuple(Category(i, f"c{i}") for i in range(1, 6)), 6)
    with pytest.raises(CategoryError) as info:
        small.parse_classes("zebra")
    assert "are c1, c2, c3, c4, c5 (names" in str(info.value)   # all five: no "..."
    assert small.describe() == "5 file categories (c1, c2, c3, c4, ...)"
    four = custom_table(tuple(Category(i, f"c{i}") for i in range(1, 5)), 5)
    assert four.describe() == "4 file categories (c1, c2, c3, c4)"


@pytest.mark.parametrize("command", ["export", "render"])
def test_an_empty_classes_list_is_refused_not_read_as_every_class(tmp_path, capsys, command):
    """``--classes "$CLASSES"`` with the variable unset: one line, exit 2, nothing written
    (it exported every class)."""
    from segpipe import cli
    from test_untrusted_runs import run_with

    run = run_with(tmp_path)
    (tmp_path / "images").mkdir()
    where = ["--images", str(tmp_path / "images")] if command == "render" else []
    assert cli.main([command, str(run), *where, "--to", str(tmp_path / "to"), "--classes", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "no class given" in err and "\n" not in err
    assert not (tmp_path / "to").exists()


def test_category_tables_keep_supercategories_and_explain_wrong_counts():
    table = custom_table((Category(7, "cat", "animal"), Category(3, "cup")), 3)
    back = type(table).from_json(table.to_json())
    assert back == table and back.categories[0].supercategory == "animal"
    assert table.to_json()["categories"][0] == {"id": 7, "name": "cat", "supercategory": "animal",
                                                "label": 1}
    legacy = {**table.to_json(), "categories": [{"id": 7, "name": "cat", "label": 1},
                                                {"id": 3, "name": "cup", "label": 2}]}
    assert [c.supercategory for c in type(table).from_json(legacy).categories] == ["", ""]
    with pytest.raises(CategoryError) as info:
        custom_table((Category(0, "Background"), Category(7, "cat"), Category(3, "cup")), 3)
    assert str(info.value) == (
        "the categories file names 3 categories, but the model has 3 classes (background + 2): "
        "give exactly 2 categories, label 1 first; leave out the background entry 'Background'")
    with pytest.raises(CategoryError) as info:
        custom_table((Category(7, "cat"),), 3)
    assert str(info.value).endswith("give exactly 2 categories, label 1 first")
    generated = generated_table(3)
    assert generated.labels == (1, 2) and generated.num_classes == 3
    assert generated.for_label(0) is None and generated.for_label(2).name == "class_2"


def test_categories_without_names_and_with_equal_ids_but_other_case():
    table = custom_table((Category(7, "Cat"),), 2)
    assert match_categories([{"id": 7, "name": "cat"}], table).how == "by id"
    with pytest.raises(ConfigError, match=r"\[''\] are not among"):
        match_categories([{"id": 7}], table)
    many = [{"id": i, "name": f"u{i}"} for i in range(1, 8)]
    with pytest.raises(ConfigError) as info:
        match_categories(many, table)
    assert "['u1', 'u2', 'u3', 'u4', 'u5'] are not among" in str(info.value)


def test_images_in_deep_folders_match_by_their_base_name(tmp_path):
    rows = [image_row("shard.tar/a/b/c.png", 10, 20, []), image_row("x/y/d.png", 10, 20, [])]
    write_predictions(tmp_path / "out", rows)
    gt = [{"id": 1, "file_name": "c.png", "width": 10, "height": 20},
          {"id": 2, "file_name": "other/root/y/d.png", "width": 10, "height": 20}]
    match = match_images(gt, str(tmp_path / "out" / "predictions"))
    assert match.pred_by_gt == {1: rows[0]["image_id"], 2: rows[1]["image_id"]}
    assert match.not_predicted == []


def test_a_new_mask_threshold_re_pastes_the_stored_soft_mask():
    from segpipe.encode.encoder import rethreshold

    stored = det(1, 0.9, x=10, y=10, w=20, h=12)
    for threshold in (0.3, 0.99):
        kept, _ = select(row_of(stored), mask_threshold=threshold)
        (area, segmentation), = rethreshold([stored], H, W, threshold,
                                            SETTINGS.soft_mask_dtype)
        assert (kept[0]["area"], kept[0]["segmentation"]) == (area, segmentation)
    assert 0 < kept[0]["area"] < stored["area"]   # at 0.99 the bilinear edges fall away
    kept, _ = select(row_of(stored), mask_threshold=SETTINGS.mask_threshold)  # the run's own
    assert kept[0]["segmentation"] == stored["segmentation"]


def test_counts_add_up_over_the_images_of_an_export():
    counts = ExportCounts()
    options = ExportOptions(score_threshold=0.5, max_per_image=1, min_area=3)
    for _ in range(3):
        select_detections(row_of(det(1, 0.9), det(1, 0.8), det(1, 0.1), det(12, 0.9),
                                 {**det(1, 0.9), "area": 0}, det(1, 0.9, w=1, h=1)),
                          options, SETTINGS, counts)
    assert (counts.detections, counts.over_max_per_image, counts.below_threshold,
            counts.unknown_category_left_out, counts.empty_masks_left_out,
            counts.small_masks_left_out) == (18, 3, 3, 3, 3, 3)


def test_class_lists_of_six_or_more_end_their_examples_with_dots():
    six = custom_table(tuple(Category(i, f"c{i}") for i in range(1, 7)), 7)
    with pytest.raises(CategoryError) as info:
        six.parse_classes("zebra")
    assert "are c1, c2, c3, c4, c5, ... (names" in str(info.value)


def test_an_exact_name_wins_where_base_names_are_ambiguous(tmp_path):
    rows = [image_row("y/b.png", 10, 20, []), image_row("z/b.png", 10, 20, [])]
    write_predictions(tmp_path / "out", rows)
    gt = [{"id": 1, "file_name": "z/b.png", "width": 10, "height": 20}]
    match = match_images(gt, str(tmp_path / "out" / "predictions"))
    assert match.pred_by_gt == {1: rows[1]["image_id"]} and match.not_predicted == []


def test_stored_soft_masks_dequantise_to_their_probabilities():
    from segpipe.encode.encoder import dequantise_soft_masks, quantise_soft_masks

    stored = bytes([0, 128, 254, 255])
    np.testing.assert_array_equal(dequantise_soft_masks([stored], "uint8"),
                                  np.array([[[0, 128 / 255], [254 / 255, 1.0]]], np.float32))
    probabilities = np.array([[[0.0, 0.5], [0.996, 1.0]]], np.float32)
    assert quantise_soft_masks(probabilities, "uint8").tobytes() == bytes([0, 128, 254, 255])
    assert quantise_soft_masks(probabilities).tobytes() == \
        np.array([0, 32768, 65273, 65535], np.uint16).tobytes()
    with pytest.raises(ValueError, match="not squares of uint8"):
        dequantise_soft_masks([bytes(3)], "uint8")


def test_runs_stored_with_uint8_soft_masks_still_export_at_a_new_threshold(tmp_path):
    """Runs written before soft masks were uint16 have uint8 ones and no record of it."""
    import dataclasses
    import json

    from segpipe.encode.encoder import dequantise_soft_masks, encode_masks, quantise_soft_masks
    from segpipe.commands.export import run_export
    from segpipe.model.settings import RunSettings
    from segpipe.schema import RUN_SETTINGS_KEY
    from synthetic import blob_detections

    soft, boxes = blob_detections(6, H, W, seed=4, smallest=4, largest=20)
    old = dataclasses.replace(SETTINGS, soft_mask_dtype="uint8")
    metadata = json.loads(old.to_metadata()[RUN_SETTINGS_KEY])
    del metadata["soft_mask_dtype"]                       # as runs before it wrote them
    assert RunSettings.from_metadata({RUN_SETTINGS_KEY: json.dumps(metadata)}) == old
    stored = quantise_soft_masks(soft, "uint8")
    rles, areas = encode_masks(soft, boxes, H, W, 0.5)
    dets = [{**det(1, 0.9), "box": b.tolist(), "soft_mask": q.tobytes(), "area": int(a),
             "segmentation": r} for b, q, a, r in zip(boxes, stored, areas, rles)]
    write_predictions(tmp_path / "old", [image_row("a.png", W, H, dets)], settings=old)
    run_export(str(tmp_path / "old"), str(tmp_path / "x"),
               ExportOptions(score_threshold=0.5, mask_threshold=0.3))
    exported = json.loads((tmp_path / "x" / "results.json").read_text())
    expected, new_areas = encode_masks(
        dequantise_soft_masks([q.tobytes() for q in stored], "uint8"), boxes, H, W, 0.3)
    assert [r["segmentation"] for r in exported] == \
        [e for e, a in zip(expected, new_areas) if a > 0]
    assert len(exported) >= 4


@pytest.mark.parametrize("segmentation", [
    {"size": [50, 50], "counts": "0\\\\ab]5<Ho"},          # RLE strings hold backslashes
    [[1.0, 2.0, 10.5, 2.0, 10.5, 7.25]],                # polygons
    None,                                                # box-only detectors
])
def test_results_written_directly_equal_json_dumps(segmentation):
    import json

    from segpipe.coco.writer import _box_json, _result_members

    detection = {**det(3, 0.123456789), "bbox": [0.1, 2.0, 1e-7, 3.3333333], "score": 0.87654321,
                 "segmentation": segmentation}
    head, tail = _result_members(2**53 - 1, detection)
    text = "{" + head + _box_json(detection["bbox"]) + tail + "}"
    assert text == json.dumps(coco_result(2**53 - 1, detection), separators=(",", ":"),
                              ensure_ascii=False)


def test_float32_soft_masks_re_export_pixel_for_pixel():
    from segpipe.encode.encoder import dequantise_soft_masks, encode_masks, quantise_soft_masks
    from synthetic import blob_detections

    rng = np.random.default_rng(9)
    soft = rng.random((40, 28, 28)).astype(np.float32)    # noise: the hardest case
    _, boxes = blob_detections(40, H, W, seed=9, smallest=3, largest=30)
    stored = [q.tobytes() for q in quantise_soft_masks(soft, "float32")]
    back = dequantise_soft_masks(stored, "float32")
    np.testing.assert_array_equal(back, soft)
    for threshold in (0.3, 0.7):
        assert encode_masks(back, boxes, H, W, threshold)[0] == \
            encode_masks(soft, boxes, H, W, threshold)[0]

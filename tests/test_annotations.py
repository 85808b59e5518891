"""Annotations that labelling and training tools take without loss: pixel-edge polygons, tight
boxes, ids exact in every JSON tool, crowd ground truth explained. Checked through pycocotools
and supervision, the libraries users load COCO files with."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from conftest import small_config
from images import write_photos
from segpipe.config import ConfigError
from segpipe.commands.evaluate import run_eval
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import run_export
from segpipe.commands.segment import run_segment
from segpipe.model.settings import RunSettings
from segpipe.schema import IMAGE_IDS_BEFORE
from synthetic import SETTINGS, box_detection, image_row, write_predictions
from test_polygons import rasterise

MAX_JSON_INT = 2**53 - 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint, local_ray):
    root = tmp_path_factory.mktemp("annotations")
    write_photos(root / "images", names=("astronaut", "chelsea", "coffee", "rocket", "motorcycle"))
    run_segment(small_config(root / "images", root / "out", checkpoint, score_threshold=0.3))
    return root


def test_instances_boxes_are_the_tight_boxes_of_their_masks(run):
    instances = json.loads((run / "out" / "coco" / "instances.json").read_text())
    results = json.loads((run / "out" / "coco" / "results.json").read_text())
    assert len(instances["annotations"]) == len(results) > 20
    overshooting = 0
    for annotation, result in zip(instances["annotations"], results):
        mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
        ys, xs = np.nonzero(mask)
        x, y, w, h = annotation["bbox"]
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        # FiftyOne crops each mask to its bbox: nothing may fall outside.
        assert mask[int(y):int(y + h), int(x):int(x + w)].sum() == mask.sum() == annotation["area"]
        rx, ry, rw, rh = result["bbox"]   # results.json keeps the model's box
        overshooting += bool(xs.min() < rx - 1 or xs.max() + 1 > rx + rw + 1
                             or ys.min() < ry - 1 or ys.max() + 1 > ry + rh + 1)
    print(f"{overshooting} of {len(results)} masks reach more than 1 px past the model's box")

    model = run_export(str(run / "out"), str(run / "model-boxes"),
                       ExportOptions(score_threshold=0.3, instances_bbox="model"))
    assert model["counts"]["annotations"] == len(results)
    same = json.loads((run / "model-boxes" / "instances.json").read_text())["annotations"]
    assert [a["bbox"] for a in same] == [r["bbox"] for r in results]


def test_polygon_export_keeps_every_mask(run):
    summary = run_export(str(run / "out"), str(run / "polygons"),
                         ExportOptions(score_threshold=0.3, polygons=True))
    rles = json.loads((run / "out" / "coco" / "instances.json").read_text())["annotations"]
    polygons = json.loads((run / "polygons" / "instances.json").read_text())["annotations"]
    assert summary["counts"]["no_polygon_left_out"] == 0 and len(polygons) == len(rles)
    ious = []
    for rle, poly in zip(rles, polygons):
        height, width = rle["segmentation"]["size"]
        mask = mask_utils.decode(rle["segmentation"]).astype(bool)
        back = rasterise(poly["segmentation"], height, width)
        assert poly["area"] == rle["area"] and poly["bbox"] == rle["bbox"]
        ious.append(iou(back, mask))
    print(f"polygon round trip on {len(ious)} masks: min IoU {min(ious):.4f}, median "
          f"{np.median(ious):.4f}, {sum(i == 1.0 for i in ious)} pixel-exact; "
          f"{summary['counts']['masks_with_holes']} with holes")
    assert min(ious) == 1.0


def grown_down_right(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel to the right and down: what OpenCV's ``fillPoly`` draws for
    a polygon on pixel corners, since it fills every lattice point the polygon covers and each
    point is a corner of up to four pixels."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:, 1:] |= grown[:, :-1]
    return grown


def test_supervision_loads_rle_masks_pixel_exact_and_polygons_by_its_own_rule(run):
    """supervision is what many pipelines load COCO with. RLE masks must arrive pixel for
    pixel. Its polygons go through OpenCV's fillPoly, which treats vertices as pixel centres
    and draws the edges too: a pixel-edge polygon (which pycocotools, COCO's reference,
    rasterises exactly) comes back one pixel wider to the right and bottom, and the cuts of
    keyhole polygons (masks with holes) come back drawn, partly filling some holes. Pin both
    down, so the README can say precisely what supervision users get."""
    import supervision as sv

    run_export(str(run / "out"), str(run / "sv-polygons"),
               ExportOptions(score_threshold=0.3, polygons=True))
    coco = json.loads((run / "out" / "coco" / "instances.json").read_text())
    by_name = {i["file_name"]: i["id"] for i in coco["images"]}
    for folder in ("out/coco", "sv-polygons"):
        dataset = sv.DetectionDataset.from_coco(images_directory_path=str(run / "images"),
                                                annotations_path=str(run / folder / "instances.json"),
                                                force_masks=True)
        checked = 0
        for path, _, detections in dataset:
            expected = [a for a in coco["annotations"]
                        if a["image_id"] == by_name[path.rsplit("/", 1)[-1]]]
            assert len(detections) == len(expected)
            for mask, annotation in zip(detections.mask, expected):
                reference = mask_utils.decode(annotation["segmentation"]).astype(bool)
                checked += 1
                if folder == "out/coco":
                    np.testing.assert_array_equal(mask, reference)
                    continue
                grown = grown_down_right(reference)
                assert not (grown & ~mask).any()          # no pixel of the mask is lost
                if np.array_equal(ndimage.binary_fill_holes(reference), reference):
                    np.testing.assert_array_equal(mask, grown)   # no holes: exactly grown
        assert checked == len(coco["annotations"]) > 20


def test_image_ids_survive_json_tools_that_read_numbers_as_doubles(run):
    for name in ("instances.json", "results.json"):
        text = (run / "out" / "coco" / name).read_text()
        as_ints = json.loads(text)
        as_doubles = json.loads(text, parse_int=float)   # what JavaScript and jq do
        ids = [i["id"] for i in as_ints["images"]] if name == "instances.json" else \
            [r["image_id"] for r in as_ints]
        doubles = [i["id"] for i in as_doubles["images"]] if name == "instances.json" else \
            [r["image_id"] for r in as_doubles]
        assert ids and all(0 < i <= MAX_JSON_INT for i in ids)
        assert [int(d) for d in doubles] == ids


def test_a_run_with_the_old_63_bit_ids_is_not_resumed(tmp_path, checkpoint):
    old = RunSettings(SETTINGS.model, SETTINGS.weights_sha256, 0.5, True,
                      image_ids=IMAGE_IDS_BEFORE)
    h = w = 64
    write_predictions(tmp_path / "out", [image_row("a.png", w, h, [box_detection(
        1, 0.9, 1, 1, 5, 5, h, w)])], settings=old)
    write_photos(tmp_path / "in", names=("chelsea",))
    with pytest.raises(ConfigError, match="image_ids: 'blake2b-63' then, 'blake2b-53' now"):
        run_segment(small_config(tmp_path / "in", tmp_path / "out", checkpoint, resume=True))


def test_crowd_only_ground_truth_is_explained_and_can_count_as_objects(run, tmp_path):
    gt = json.loads((run / "out" / "coco" / "instances.json").read_text())
    for a in gt["annotations"]:
        a["iscrowd"] = 1
        a.pop("score")
    (tmp_path / "crowd.json").write_text(json.dumps(gt))
    crowd = run_eval(str(run / "out"), str(tmp_path / "crowd.json"), score_threshold=0.3,
                     iou_types=("segm",))
    assert crowd["segm"]["AP"] == -1.0
    assert "are iscrowd=1" in crowd["matching"]["crowd_message"]
    assert "--crowd-as-objects" in crowd["matching"]["crowd_message"]
    objects = run_eval(str(run / "out"), str(tmp_path / "crowd.json"), score_threshold=0.3,
                       iou_types=("segm",), crowd_as_objects=True)
    assert objects["segm"]["AP"] == pytest.approx(1.0)

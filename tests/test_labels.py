"""Label Studio tasks and YOLO datasets from a run's predictions/, read back by the tools'
own code: label-studio-sdk's brush decoder and config validation, Ultralytics' dataset
reader and rasteriser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from synthetic import SETTINGS, blob_rows, box_detection, image_row, write_predictions
from test_cli import run_cli

from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import ExportFormat, run_export
from segpipe.labels.brush import brush_rle

H, W = 120, 160


def _coco_masks(folder: Path) -> dict[str, list[tuple[str, float, np.ndarray]]]:
    """file_name -> [(category name, score, mask)] of a COCO export, in annotation order."""
    data = json.loads((folder / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    results = json.loads((folder / "results.json").read_text())
    out: dict[str, list] = {name: [] for name in files.values()}
    for ann, res in zip(data["annotations"], results):
        out[files[ann["image_id"]]].append((names[ann["category_id"]], res["score"],
                                            mask_utils.decode(ann["segmentation"]).astype(bool)))
    return out


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory) -> Path:
    """A run of 12 images of trained-like detections (sizes 16-120 px, some with holes)."""
    run = tmp_path_factory.mktemp("blobs") / "run"
    write_predictions(run, blob_rows(12, 10, H, W, seed=3), rows_per_file=5)
    return run


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 60), (200, 400), (17, 1000)])
@pytest.mark.parametrize("fill", [0.0, 0.02, 0.5, 1.0])
def test_brush_rle_is_label_studios_own_encoding(shape, fill):
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    rng = np.random.default_rng(int(fill * 100) + shape[0])
    mask = rng.random(shape) < fill
    if shape[0] * shape[1] > 10_000:   # long runs: over 65,536 values (4 a pixel) between changes
        mask = np.zeros(shape, bool)
        mask[shape[0] // 3:shape[0] // 2, shape[1] // 4:] = fill > 0
    ours = brush_rle(mask)
    assert ours == mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_rle(ours).reshape(*shape, 4)[:, :, 3] > 0, mask)


def test_label_studio_tasks_round_trip_pixel_for_pixel(blob_run, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    options = ExportOptions(score_threshold=0.3)
    run_export(str(blob_run), str(tmp_path / "coco"), options, shard_images=0)
    summary = run_export(str(blob_run), str(tmp_path / "ls"), options,
                         export_format=ExportFormat("label-studio", "/data/local-files/?d=my photos/"))
    assert summary["task_files"] == ["tasks.json"]
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    interface = LabelInterface(config)
    interface.validate()
    assert [lab for lab in interface.get_control("label").labels][:2] == ["person", "bicycle"]
    expected = _coco_masks(tmp_path / "coco")
    assert len(tasks) == 12 and sum(len(v) for v in expected.values()) == summary["counts"]["annotations"] > 30
    regions = 0
    for task in tasks:
        name = task["data"]["file_name"]
        assert task["data"]["image"] == "/data/local-files/?d=my photos/" + name.replace(" ", "%20")
        prediction = task["predictions"][0]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert prediction["model_version"].startswith("segpipe maskrcnn_resnet50_fpn ")
        got = [(r["value"]["brushlabels"][0], r["score"],
                decode_rle(r["value"]["rle"]).reshape(r["original_height"], r["original_width"], 4)[:, :, 3] > 0)
               for r in prediction["result"]]
        assert len(got) == len(expected[name])
        for (label, score, mask), (want_label, want_score, want) in zip(got, expected[name]):
            assert (label, pytest.approx(score)) == (want_label, want_score)
            assert np.array_equal(mask, want)   # IoU 1.0: every pixel, holes and parts included
            regions += 1
    assert regions == summary["counts"]["annotations"]


def test_the_documented_way_back_from_label_studio_is_exact(blob_run, tmp_path):
    """docs/labelling.md's recipe on a Label Studio JSON export in which each task's
    annotation is its accepted pre-annotation: the masks are the COCO export's."""
    import re

    run_export(str(blob_run), str(tmp_path / "coco"), ExportOptions(0.3), shard_images=0)
    run_export(str(blob_run), str(tmp_path / "ls"), ExportOptions(0.3),
               export_format=ExportFormat("label-studio", "s3://b/"))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    exported = [{**task, "annotations": [{"result": task["predictions"][0]["result"]}]} for task in tasks]
    (tmp_path / "export.json").write_text(json.dumps(exported))
    docs = (Path(__file__).parents[1] / "docs" / "labelling.md").read_text()
    recipe = re.search(r"```python\n(.*?)```", docs, re.S).group(1)
    namespace: dict = {}
    exec(recipe, namespace)
    got = namespace["corrected_masks"](str(tmp_path / "export.json"))
    expected = _coco_masks(tmp_path / "coco")
    assert got.keys() == expected.keys()
    for name, regions in got.items():
        assert [label for label, _ in regions] == [label for label, _, _ in expected[name]]
        for (_, rle), (_, _, want) in zip(regions, expected[name]):
            assert np.array_equal(mask_utils.decode(rle).astype(bool), want)


def test_label_studio_polygons_rasterise_back_to_the_masks(blob_run, tmp_path):
    """Polygon regions (one per part, holes by keyhole rings) in percent of the image: put
    back in pixels, pycocotools fills exactly the mask."""
    from label_studio_sdk.label_interface import LabelInterface

    options = ExportOptions(score_threshold=0.3)
    run_export(str(blob_run), str(tmp_path / "coco"), options, shard_images=0)
    run_export(str(blob_run), str(tmp_path / "ls"), ExportOptions(score_threshold=0.3, polygons=True),
               export_format=ExportFormat("label-studio", "s3://bucket/a b/"))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    interface = LabelInterface((tmp_path / "ls" / "label_config.xml").read_text())
    expected = _coco_masks(tmp_path / "coco")
    for task in tasks:
        assert task["data"]["image"] == "s3://bucket/a b/" + task["data"]["file_name"]
        prediction = task["predictions"][0]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        by_detection: dict[str, list] = {}
        for region in prediction["result"]:
            points = np.asarray(region["value"]["points"]) * [W / 100.0, H / 100.0]
            by_detection.setdefault(region["id"].split("p")[0], []).append(points.ravel().tolist())
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, H, W))).astype(bool)
                 for p in by_detection.values()]
        assert len(masks) == len(expected[task["data"]["file_name"]])
        for mask, (_, _, want) in zip(masks, expected[task["data"]["file_name"]]):
            assert np.array_equal(mask, want)


def test_label_studio_box_only_runs_give_rectangles(tmp_path):
    from label_studio_sdk.label_interface import LabelInterface
    from dataclasses import replace

    settings = replace(SETTINGS, model=replace(SETTINGS.model, arch="fasterrcnn_resnet50_fpn"))
    det = box_detection(1, 0.9, 10, 20, 30, 40, 100, 200)
    det.update(segmentation=None, area=None, soft_mask=None)
    write_predictions(tmp_path / "run", [image_row("a.jpg", 200, 100, [det])], settings=settings)
    run_export(str(tmp_path / "run"), str(tmp_path / "ls"), ExportOptions(0.5),
               export_format=ExportFormat("label-studio", "https://host/images"))
    task = json.loads((tmp_path / "ls" / "tasks.json").read_text())[0]
    interface = LabelInterface((tmp_path / "ls" / "label_config.xml").read_text())
    region = task["predictions"][0]["result"][0]
    assert task["data"]["image"] == "https://host/images/a.jpg"
    assert region["type"] == "rectanglelabels"
    assert region["value"]["x"] == pytest.approx(5.0) and region["value"]["height"] == pytest.approx(40.0)
    assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []


@pytest.fixture(scope="module", autouse=True)
def ultralytics_settings(tmp_path_factory):
    """Ultralytics keeps its settings in this module's temporary folder, not the home's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
        yield


def yolo_masks(dataset_dir: Path, names: list[str]):
    """Each image's labels as Ultralytics reads them (its YOLODataset), rasterised by its
    polygon2mask: file_name -> [(class name, mask)] (Ultralytics drops repeated lines and
    may reorder an image's labels then: ``matched_ious`` pairs them)."""
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import polygon2mask

    out = {}
    for part in ("train", "val"):
        listed = (dataset_dir / f"{part}.txt").read_text().split()
        if not listed:
            continue
        dataset = YOLODataset(img_path=str(dataset_dir / f"{part}.txt"), data={"names": dict(enumerate(names)),
                              "channels": 3}, task="segment", augment=False)
        for label in dataset.labels:
            h, w = label["shape"]
            name = os.path.relpath(label["im_file"], dataset_dir / "images")
            masks = [polygon2mask((h, w), [seg.ravel() * np.tile([w, h], len(seg))]).astype(bool)
                     for seg in label["segments"]]
            out[name] = [(names[int(c)], m) for c, m in zip(label["cls"].ravel(), masks)]
    return out


def matched_ious(want: list[np.ndarray], classes: list[str], got: list[tuple[str, np.ndarray]]) -> list[float]:
    """IoU of each wanted mask with the unused read-back mask of its class it overlaps most
    (0 when none is left: Ultralytics dropped it)."""
    unused = list(range(len(got)))
    ious = []
    for name, mask in zip(classes, want):
        scored = [((mask & got[k][1]).sum() / max((mask | got[k][1]).sum(), 1), k)
                  for k in unused if got[k][0] == name]
        iou, k = max(scored, default=(0.0, None))
        if k is not None:
            unused.remove(k)
        ious.append(float(iou))
    return ious


def test_yolo_dataset_reads_back_through_ultralytics(blob_run, tmp_path):
    images = tmp_path / "photos"
    for k in range(12):
        (images / "blobs").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H)).save(images / "blobs" / f"{k:04d}.jpg")
    options = ExportOptions(score_threshold=0.3)
    run_export(str(blob_run), str(tmp_path / "coco"), options, shard_images=0)
    summary = run_export(str(blob_run), str(tmp_path / "yolo"), options,
                         export_format=ExportFormat("yolo", str(images), 0.25, 7))
    root = tmp_path / "yolo"
    assert summary["train"] + summary["val"] == 12 and summary["linked"] == 12
    assert summary["val"] > 0 and summary["train"] > 0
    data = (root / "data.yaml").read_text()
    assert '  0: "person"' in data and f'path: "{root}"' in data
    got = yolo_masks(root, summary["classes"])
    expected = _coco_masks(tmp_path / "coco")
    ious, small = [], []
    for name, dets in expected.items():
        assert [c for c, _ in got[name]] == [c for c, _, _ in dets]
        for (_, mask), (_, _, want) in zip(got[name], dets):
            iou = (mask & want).sum() / (mask | want).sum()
            parts = len(__import__("cv2").findContours(want.astype(np.uint8), 0, 2)[0])
            (ious if want.sum() >= 200 and parts == 1 else small).append(iou)
            if parts == 1:
                assert iou == 1.0   # one part (holes too): every pixel
    assert len(ious) > 20 and min(ious) == 1.0
    # the same seed gives the same split; another seed another
    again = run_export(str(blob_run), str(tmp_path / "yolo"), options,
                       export_format=ExportFormat("yolo", str(images), 0.25, 7))
    assert (again["train"], again["val"]) == (summary["train"], summary["val"])


def test_yolo_links_resolve_from_a_relative_image_root(blob_run, tmp_path, monkeypatch):
    (tmp_path / "photos" / "blobs").mkdir(parents=True)
    for k in range(12):
        Image.new("RGB", (W, H)).save(tmp_path / "photos" / "blobs" / f"{k:04d}.jpg")
    (tmp_path / "photos" / "blobs" / "0011.jpg").unlink()
    monkeypatch.chdir(tmp_path)
    summary = run_export(str(blob_run), "yolo", ExportOptions(0.5),
                         export_format=ExportFormat("yolo", "photos"))
    assert (summary["linked"], summary["missing_images"]) == (11, 1)
    assert not os.path.lexists(tmp_path / "yolo" / "images" / "blobs" / "0011.jpg")
    link = tmp_path / "yolo" / "images" / "blobs" / "0003.jpg"
    assert link.is_symlink() and link.resolve() == (tmp_path / "photos" / "blobs" / "0003.jpg").resolve()
    assert Image.open(link).size == (W, H)


def test_yolo_reads_pixels_and_lines_as_polygons(tmp_path):
    """Masks of one pixel or one straight line have contours of 1 or 2 points; written as
    such, Ultralytics reads the line as a box row and drops every label of the image."""
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (W, H)).save(tmp_path / "photos" / "a.jpg")
    dets = [box_detection(1, 0.9, 10, 10, 30, 20, H, W), box_detection(1, 0.8, 50, 50, 1, 1, H, W),
            box_detection(1, 0.7, 70, 30, 25, 1, H, W), box_detection(3, 0.6, 100, 20, 1, 40, H, W)]
    write_predictions(tmp_path / "run", [image_row("a.jpg", W, H, dets)])
    run_export(str(tmp_path / "run"), str(tmp_path / "yolo"), ExportOptions(0.5),
               export_format=ExportFormat("yolo", str(tmp_path / "photos"), 0.0))
    got = yolo_masks(tmp_path / "yolo", ["person", "bicycle", "car"])["a.jpg"]
    want = [mask_utils.decode(d["segmentation"] | {"counts": d["segmentation"]["counts"].encode()}).astype(bool)
            for d in dets]
    assert matched_ious(want, ["person", "person", "person", "car"], got) == [1.0] * 4


def test_yolo_leaves_links_it_did_not_make_alone(blob_run, tmp_path):
    """A link already at an image's place (another target) stays; nothing is written through
    a folder that links out of the dataset."""
    photos, elsewhere = tmp_path / "photos" / "blobs", tmp_path / "elsewhere"
    photos.mkdir(parents=True)
    elsewhere.mkdir()
    for k in range(12):
        Image.new("RGB", (W, H)).save(photos / f"{k:04d}.jpg")
    to = tmp_path / "yolo"
    run_export(str(blob_run), str(to), ExportOptions(0.5), export_format=ExportFormat("yolo"))
    (to / "images" / "blobs").mkdir(parents=True)
    os.symlink(tmp_path / "mine.jpg", to / "images" / "blobs" / "0001.jpg")
    (to / "labels" / "blobs" / "0002.txt").unlink()
    os.symlink(elsewhere / "0002.txt", to / "labels" / "blobs" / "0002.txt")
    summary = run_export(str(blob_run), str(to), ExportOptions(0.5),
                         export_format=ExportFormat("yolo", str(tmp_path / "photos")))
    assert (summary["linked"], summary["left_alone"]) == (11, 2)
    assert os.readlink(to / "images" / "blobs" / "0001.jpg") == str(tmp_path / "mine.jpg")
    assert list(elsewhere.iterdir()) == []


def test_yolo_names_and_split_are_stable():
    import pyarrow as pa

    from segpipe.labels.yolo import YoloSplit, dataset_names, label_names

    names = dataset_names(pa.chunked_array([["a.jpg", "a.png", "images/x.JPG", "b/images/c.webp",
                                             "noext", "d.tar.gz"]])).to_pylist()
    assert names == ["a.jpg.jpg", "a.png.png", "images_/x.JPG", "b/images_/c.webp", "noext.jpg",
                     "d.tar.gz.jpg"]
    assert label_names(pa.array(names[:2])).to_pylist() == ["labels/a.jpg.txt", "labels/a.png.txt"]
    split = YoloSplit(0.2, seed=1)
    picks = [split.is_val(f"img_{k}.jpg") for k in range(2000)]
    assert 0.17 < sum(picks) / 2000 < 0.23
    assert picks == [YoloSplit(0.2, seed=1).is_val(f"img_{k}.jpg") for k in range(2000)]
    assert picks != [YoloSplit(0.2, seed=2).is_val(f"img_{k}.jpg") for k in range(2000)]


def test_yolo_multi_part_masks_cost_only_their_cuts():
    """Two separate parts joined as Ultralytics joins segments: fillPoly draws the cut, a
    1-pixel line, and nothing else changes."""
    import cv2

    from segpipe.labels.yolo import join_rings, mask_rings

    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 10:30] = 1
    mask[14:20, 15:22] = 0            # a hole
    mask[40:55, 50:75] = 1            # a second part
    ring = join_rings(mask_rings(mask))
    drawn = np.zeros_like(mask)
    cv2.fillPoly(drawn, [((ring + 0.5).astype(np.int32))], 1)
    extra = drawn.astype(bool) & ~mask.astype(bool)
    assert not (mask.astype(bool) & ~drawn.astype(bool)).any()   # no pixel lost, the hole kept
    assert 0 < extra.sum() <= 2 * 25   # the cut across the gap, about its length


def test_yolo_a_mask_of_many_fragments_keeps_every_pixel():
    """A mask in hundreds of pieces (as a noisy model gives) is one polygon that draws every
    piece (the joining measures each pair of rings once: before, such masks took minutes)."""
    import cv2

    from segpipe.labels.yolo import join_rings, mask_rings

    noise = np.random.default_rng(3).random((200, 260)).astype(np.float32)
    mask = (cv2.GaussianBlur(noise, (0, 0), 1.5) > 0.56).astype(np.uint8)
    rings = mask_rings(mask)
    assert len(rings) > 150
    ring = join_rings(rings)
    assert len(ring) == sum(len(r) for r in rings) + 2 * (len(rings) - 1)   # each cut: 2 vertices
    drawn = np.zeros_like(mask)
    cv2.fillPoly(drawn, [((ring + 0.5).astype(np.int32))], 1)
    assert not (mask.astype(bool) & ~drawn.astype(bool)).any()


def test_export_format_mistakes_are_one_line_exit_2(blob_run, tmp_path):
    for args, words in (
            (["--format", "label-studio"], "needs --image-root"),
            (["--format", "yolo", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1]"),
            (["--format", "yolo", "--image-root", "s3://bucket/x"], "is not a local folder")):
        result = run_cli("export", str(blob_run), "--to", str(tmp_path / "out"), *args)
        assert result.returncode == 2, result
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    foreign = tmp_path / "foreign"
    (foreign / "labels").mkdir(parents=True)
    result = run_cli("export", str(blob_run), "--to", str(foreign), "--format", "yolo")
    assert result.returncode == 2 and "labels" in result.stderr


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "export.json"}


@pytest.mark.ray
def test_ray_tasks_write_the_same_label_files_as_one_process(blob_run, tmp_path, local_ray, monkeypatch):
    """Task files and YOLO parts written by Ray tasks (as with --address) are byte for byte
    those this process writes."""
    import segpipe.labels.label_studio as label_studio
    import segpipe.labels.yolo as yolo
    from segpipe.output.run_folder import predictions_dir, read_run_settings

    monkeypatch.setattr(label_studio, "TASKS_PER_FILE", 5)
    monkeypatch.setattr(yolo, "PART_IMAGES", 5)
    predictions = predictions_dir(str(blob_run))
    settings = read_run_settings(predictions)
    options = ExportOptions(score_threshold=0.3)
    for parallel in (False, True):
        label_studio.export_label_studio(predictions, str(tmp_path / f"ls-{parallel}"), options, settings,
                                         "/data/local-files/?d=", parallel=parallel)
        yolo.export_yolo(predictions, str(tmp_path / f"yolo-{parallel}"), options, settings,
                         yolo.YoloSplit(0.3, 1), parallel=parallel)
    tasks = _files(tmp_path / "ls-True")
    assert sorted(tasks) == ["label_config.xml", "tasks-00000-of-00003.json", "tasks-00001-of-00003.json",
                             "tasks-00002-of-00003.json"]
    assert tasks == _files(tmp_path / "ls-False")
    labels, serial = _files(tmp_path / "yolo-True"), _files(tmp_path / "yolo-False")
    assert len([name for name in labels if name.startswith("labels/")]) == 12
    assert labels.pop("data.yaml").replace(b"yolo-True", b"yolo-False") == serial.pop("data.yaml")
    assert labels == serial


def test_the_api_exports_labels_and_reviews(blob_run, tmp_path):
    import segpipe

    result = segpipe.export_labels(str(blob_run), str(tmp_path / "ls"), "label-studio", image_root="s3://b/")
    assert result.files == [str(tmp_path / "ls" / "tasks.json"), str(tmp_path / "ls" / "label_config.xml")]
    assert result.counts.ok == 12 and result.counts.annotations == result.summary["counts"]["annotations"] > 0
    yolo = segpipe.export_labels(str(blob_run), str(tmp_path / "yolo"), "yolo", val_fraction=0.5, split_seed=3)
    assert yolo.summary["train"] + yolo.summary["val"] == 12
    with pytest.raises(segpipe.ConfigError, match="format must be"):
        segpipe.export_labels(str(blob_run), str(tmp_path / "x"), "coco")
    import segpipe.review   # the package of the same name must not hide the function

    summary = segpipe.review_queue(str(blob_run), str(tmp_path / "q"), top=3, subset="coco")
    assert summary["images"] == 12 and summary["subset"]["images"] == 3
    assert (tmp_path / "q" / "review.jsonl").read_text().count("\n") == 12

"""``segpipe render``: images of the input's size, drawn masks, a gallery, names, exit status."""

from __future__ import annotations

import re
import urllib.parse

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import small_config
from images import write_photos
from segpipe.model.categories import COCO_TABLE
from segpipe.output.run_folder import prediction_files
from segpipe.commands.segment import run_segment
from segpipe.commands.render import RenderRequest, rendered_names, run_render
from test_cli import run_cli


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, checkpoint, local_ray):
    root = tmp_path_factory.mktemp("render")
    write_photos(root / "images", names=("astronaut", "coffee"))
    write_photos(root / "images" / "sub dir", names=("chelsea",))
    run_segment(small_config(root / "images", root / "out", checkpoint))
    summary = run_render(RenderRequest(str(root / "out"), str(root / "images"),
                                       str(root / "gallery"), score_threshold=0.5))
    return root, summary


def drawn(det: dict) -> bool:
    """What render draws at --score-threshold 0.5: scored, non-empty, a real category."""
    return det["score"] >= 0.5 and det["area"] > 0 and det["category_id"] in COCO_TABLE.ids


def test_drawn_masks_are_coloured_and_undrawn_pixels_are_not(rendered):
    root, summary = rendered
    assert summary["rendered"] == 3 and not summary["errors"]
    rows = [r for p in prediction_files(str(root / "out" / "predictions"))
            for r in pq.read_table(p).to_pylist()]
    changed = 0
    for row in rows:
        original = np.asarray(Image.open(root / "images" / row["file_name"]).convert("RGB"),
                              np.float32)
        path = root / "gallery" / "images" / re.sub(r"\.png$", ".jpg", row["file_name"])
        image = np.asarray(Image.open(path), np.float32)
        assert image.shape == original.shape
        union = np.zeros(original.shape[:2], bool)
        boxes = np.zeros(original.shape[:2], bool)
        for det in filter(drawn, row["detections"]):
            mask = mask_utils.decode(det["segmentation"]).astype(bool)
            union |= mask
            x, y, w, h = (int(round(v)) for v in det["bbox"])
            boxes[max(y - 4, 0):y + h + 4, max(x - 4, 0):x + w + 4] = True  # the box
            boxes[max(y - 20, 0):y + 4, max(x - 4, 0):x + 160] = True  # its label
            if det["area"] > 50:
                # Half the instance colour over the photo: mean change well above JPEG noise.
                assert np.abs(image[mask] - original[mask]).mean() > 20
                changed += 1
        untouched = ~union & ~boxes
        assert np.abs(image[untouched] - original[untouched]).mean() < 6  # JPEG noise only
    assert changed > 0


def test_gallery_links_every_image_under_its_own_name(rendered):
    root, _ = rendered
    page = (root / "gallery" / "index.html").read_text()
    links = {urllib.parse.unquote(h) for h in re.findall(r'<a href="([^"]+)"', page)}
    assert links == {"images/astronaut.jpg", "images/coffee.jpg", "images/sub dir/chelsea.jpg"}
    for link in links:
        assert (root / "gallery" / link).is_file()
    assert "Instances per class" in page and "<svg" in page


def test_rendered_names_keep_jpg_avoid_clashes_and_stay_inside():
    names = rendered_names(["a.png", "a.jpg", "b.JPEG", "c.tif", "d/e.webp", "../../x.png",
                            "/abs/y.png", "s.tar/0001.jpg"])
    assert names == {"a.png": "a.png.jpg", "a.jpg": "a.jpg", "b.JPEG": "b.JPEG", "c.tif": "c.jpg",
                     "d/e.webp": "d/e.jpg", "../../x.png": "x.jpg", "/abs/y.png": "abs/y.jpg",
                     "s.tar/0001.jpg": "s.tar/0001.jpg"}


def test_paths_are_checked_before_ray_and_nothing_drawn_exits_1(rendered, tmp_path):
    root, _ = rendered
    missing = run_cli("render", str(root / "out"), "--images", str(tmp_path / "nowhere"),
                      "--to", str(tmp_path / "g1"))
    assert missing.returncode == 2 and "--images" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "g1").exists()
    (tmp_path / "file").write_text("x")
    to_file = run_cli("render", str(root / "out"), "--images", str(root / "images"),
                      "--to", str(tmp_path / "file"))
    assert to_file.returncode == 2 and "is a file" in to_file.stderr
    # Images of the wrong size: every one fails to draw, and that is not success.
    wrong = tmp_path / "wrong"
    write_photos(wrong, names=("astronaut", "coffee"), scale=0.25)
    write_photos(wrong / "sub dir", names=("chelsea",), scale=0.25)
    failed = run_cli("render", str(root / "out"), "--images", str(wrong), "--to",
                     str(tmp_path / "g2"), "--no-progress")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "0 images drawn, 3 failed" in failed.stdout
    assert "predictions were made on" in failed.stdout


def test_rendered_names_are_one_to_one_and_fit_a_disk():
    long = "n" * 250 + ".png"
    inputs = ["a.png", "a.jpg", "x\\y.jpg", "x/y.jpg", "A.JPG", "a.png.jpg", long, "m" * 251 + ".jpg"]
    names = rendered_names(inputs)
    assert len({n.lower() for n in names.values()}) == len(inputs)
    assert names["A.JPG"] == "A.JPG" and names["x/y.jpg"] == "x/y.jpg"   # first by name
    assert names["a.png.jpg"] == "a.png.jpg" and names["a.png"] not in ("a.jpg", "a.png.jpg")
    assert all(len(part.encode()) <= 200 for n in names.values() for part in n.split("/"))
    assert names[long].endswith(".jpg")

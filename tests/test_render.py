"""``segpipe render``: images of the input's size, masks drawn in colour, a gallery of all."""

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
from segpipe.pipeline import run_segment
from segpipe.render import run_render
from segpipe.sinks import prediction_files


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, checkpoint, local_ray):
    root = tmp_path_factory.mktemp("render")
    write_photos(root / "images", names=("astronaut", "coffee"))
    write_photos(root / "images" / "sub dir", names=("chelsea",))
    run_segment(small_config(root / "images", root / "out", checkpoint))
    summary = run_render(str(root / "out"), str(root / "images"), str(root / "gallery"),
                         score_threshold=0.5)
    return root, summary


def test_rendered_images_keep_the_input_size_and_colour_the_masks(rendered):
    root, summary = rendered
    assert summary["rendered"] == 3 and not summary["errors"]
    rows = [r for p in prediction_files(str(root / "out" / "predictions"))
            for r in pq.read_table(p).to_pylist()]
    changed = 0
    for row in rows:
        original = np.asarray(Image.open(root / "images" / row["file_name"]).convert("RGB"),
                              np.float32)
        drawn = np.asarray(Image.open(root / "gallery" / "images" / (row["file_name"] + ".jpg")),
                           np.float32)
        assert drawn.shape == original.shape
        for det in row["detections"]:
            if det["score"] >= 0.5 and det["area"] > 50:
                mask = mask_utils.decode(det["segmentation"]).astype(bool)
                assert np.abs(drawn[mask] - original[mask]).mean() > 20
                changed += 1
    assert changed > 0


def test_gallery_links_every_image(rendered):
    root, _ = rendered
    page = (root / "gallery" / "index.html").read_text()
    links = {urllib.parse.unquote(h) for h in re.findall(r'<a href="([^"]+)"', page)}
    assert links == {"images/astronaut.png.jpg", "images/coffee.png.jpg",
                     "images/sub dir/chelsea.png.jpg"}
    for link in links:
        assert (root / "gallery" / link).is_file()
    assert "Instances per class" in page and "<svg" in page

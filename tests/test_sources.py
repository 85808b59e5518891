"""Listing inputs: extensions in any case, relative names, stable ids, clear errors."""

import pytest

from images import AWKWARD_EXPECTED, write_awkward_inputs
from segpipe.config import ConfigError
from segpipe.io.sources import image_id_for, list_images, split_listing


def test_lists_images_recursively_with_relative_names(tmp_path):
    write_awkward_inputs(tmp_path)
    listing = list_images(str(tmp_path))
    names = listing.column("file_name").to_pylist()
    assert names == sorted(AWKWARD_EXPECTED)
    assert "readme.txt" not in names
    ids = listing.column("image_id").to_pylist()
    assert ids == [image_id_for(n) for n in names] and len(set(ids)) == len(ids)
    assert all(0 < i <= 2**53 - 1 for i in ids)  # exact in every JSON tool
    blocks = split_listing(listing, target_blocks=4)
    assert sum(b.num_rows for b in blocks) == listing.num_rows and len(blocks) == 4


def test_ids_are_stable_and_depend_on_the_relative_name():
    assert image_id_for("a/b.jpg") == image_id_for("a/b.jpg") != image_id_for("b.jpg")


def test_missing_or_empty_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list_images(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no image file"):
        list_images(str(tmp_path))

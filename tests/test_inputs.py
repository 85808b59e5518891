"""Inputs beyond a folder: WebDataset-style tar shards and Parquet tables of image bytes."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from images import write_photos
from segpipe.config import ConfigError
from segpipe.commands.segment import run_segment
from segpipe.output.run_folder import prediction_files


def rows(out) -> dict[str, dict]:
    found = [r for p in prediction_files(str(out / "predictions")) for r in pq.read_table(p).to_pylist()]
    assert max(Counter(r["image_id"] for r in found).values()) == 1
    return {r["file_name"]: r for r in found}


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return {p.stem: p.read_bytes() for p in write_photos(folder, names=("chelsea", "coffee", "rocket"))}


def test_tar_shards_one_row_per_image_member(tmp_path, photos, checkpoint, local_ray):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        add(tar, "a/001.png", photos["chelsea"])
        add(tar, "a/001.json", b'{"caption": "a cat"}')
        add(tar, "002.png", photos["coffee"])
    with tarfile.open(shards / "shard-001.tar", "w") as tar:
        add(tar, "003.png", photos["rocket"])
        add(tar, "004.jpg", b"not a jpeg")
    config = small_config(shards, tmp_path / "out", checkpoint)
    report = run_segment(config)
    found = rows(tmp_path / "out")
    assert {n: r["status"] for n, r in found.items()} == {
        "shard-000.tar/a/001.png": "ok", "shard-000.tar/002.png": "ok",
        "shard-001.tar/003.png": "ok", "shard-001.tar/004.jpg": "error"}
    assert report.accounting.listed is None and report.accounting.complete
    resumed = run_segment(small_config(shards, tmp_path / "out", checkpoint, resume=True))
    assert resumed.processed == 0 and resumed.resumed_from == 4 and len(rows(tmp_path / "out")) == 4


def test_parquet_tables_with_and_without_a_name_column(tmp_path, photos, checkpoint, local_ray):
    tables = tmp_path / "tables"
    tables.mkdir()
    pq.write_table(pa.table({"name": ["cat.png", "cup.png"],
                             "img": [photos["chelsea"], photos["coffee"]]}), tables / "part-0.parquet")
    pq.write_table(pa.table({"name": ["rocket.png", "junk.png"],
                             "img": [photos["rocket"], b"junk"]}), tables / "part-1.parquet")
    run_segment(small_config(tables, tmp_path / "named", checkpoint, image_column="img",
                             name_column="name"))
    assert {n: r["status"] for n, r in rows(tmp_path / "named").items()} == {
        "cat.png": "ok", "cup.png": "ok", "rocket.png": "ok", "junk.png": "error"}

    hf = tmp_path / "hf"
    hf.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": photos["chelsea"], "path": None}]}), hf / "train.parquet")
    run_segment(small_config(hf, tmp_path / "unnamed", checkpoint))
    (name, row), = rows(tmp_path / "unnamed").items()
    assert name.startswith("train.parquet#") and row["status"] == "ok"

    # render reads the images back from the tables, as the run read them
    from segpipe.commands.render import RenderRequest, run_render

    for output, images, drawn in (("named", tables, 3), ("unnamed", hf, 1)):
        summary = run_render(RenderRequest(output=str(tmp_path / output), images_uri=str(images),
                                           to=str(tmp_path / f"{output}-gallery"),
                                           score_threshold=0.05))
        assert summary["rendered"] == drawn and not summary["errors"], summary

    with pytest.raises(ConfigError, match="--image-column 'pixels' is not a column"):
        run_segment(small_config(tables, tmp_path / "bad", checkpoint, image_column="pixels"))


def test_every_row_of_a_container_gets_a_name_of_its_own(tmp_path, photos):
    """file_name and image_id name one image: a tar holding one member name twice and a table
    holding the same bytes twice (a dataset's duplicate pictures) give each row its own name,
    in order, as the run and render both read them."""
    from segpipe.io import storage
    from segpipe.io.image_tables import table_images
    from segpipe.io.tar_shards import tar_images

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, photo in (("a/1.png", "chelsea"), ("a/1.png", "coffee"), ("a/1-2.png", "rocket"),
                            ("a/1.png", "rocket")):
            add(tar, name, photos[photo])
    fs, root = storage.resolve(str(tmp_path))
    names = [name for name, _ in tar_images(fs, f"{root}/s.tar", "s.tar")]
    assert names == ["s.tar/a/1.png", "s.tar/a/1-2.png", "s.tar/a/1-2-2.png", "s.tar/a/1-3.png"]

    pq.write_table(pa.table({"image": [photos["chelsea"], photos["coffee"], photos["chelsea"],
                                       photos["chelsea"]]}), tmp_path / "t.parquet",
                   row_group_size=2)   # the repeats span row groups
    names = [name for name, _, _ in table_images(fs, f"{root}/t.parquet", "t.parquet", "image", None)]
    assert len(set(names)) == 4 and names[2:] == [names[0] + "-2", names[0] + "-3"]


@pytest.mark.parametrize("tables,named", [
    ({"a.parquet": ["x.png", "y.png", "x.png"]}, "'x.png' to two rows of"),
    ({"a.parquet": ["x.png", "y.png"], "b.parquet": ["z.png", "y.png"]}, "'y.png' to rows of"),
])
def test_a_name_column_naming_two_rows_alike_is_refused_before_any_work(tmp_path, photos, tables,
                                                                         named):
    from segpipe.io import formats

    for table, names in tables.items():
        pq.write_table(pa.table({"name": names, "image": [photos["chelsea"]] * len(names)}),
                       tmp_path / table)
    with pytest.raises(ConfigError, match=named):
        formats.list_inputs(str(tmp_path), "auto", name_column="name")
    formats.list_inputs(str(tmp_path), "auto")   # named by their bytes instead: accepted

"""Inputs a careless or hostile user gives: dangerous names, symbolic-link loops, files reached
twice, OUTPUT inside INPUT, a gallery rendered into INPUT. Nothing escapes its folder and no
image is segmented twice or segpipe's own files as images."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from images import write_photos
from segpipe.io import formats, image_tables, ownership, sources, tar_shards
from segpipe.output.run_folder import prediction_files
from segpipe.commands.segment import run_segment
from segpipe.commands.render import RenderRequest, run_render
from segpipe.io.sources import safe_file_name
from test_inputs import add


@pytest.mark.parametrize("name,safe", [
    ("a/b.jpg", "a/b.jpg"),
    ("../../x.jpg", "%2E%2E/%2E%2E/x.jpg"),
    ("/abs/x.jpg", "%2Fabs/x.jpg"),
    ("a/../../b.jpg", "a/%2E%2E/%2E%2E/b.jpg"),
    ("./a.jpg", "%2E/a.jpg"),
    ("a//b.jpg", "a/%00/b.jpg"),
    ("50%.jpg", "50%25.jpg"),
    ("a\\..\\b.jpg", "a%5C..%5Cb.jpg"),
    ("tab\there.jpg", "tab%09here.jpg"),
])
def test_names_become_safe_relative_paths_one_to_one(name, safe):
    assert safe_file_name(name) == safe
    for segment in safe.split("/"):
        assert segment not in ("", ".", "..")
    assert not safe.startswith("/") and "\\" not in safe


def test_distinct_names_stay_distinct():
    names = ["x.jpg", "../x.jpg", "/x.jpg", "%2E%2E/x.jpg", "./x.jpg", "%2Fx.jpg"]
    assert len({safe_file_name(n) for n in names}) == len(names)


def test_encoded_names_still_reach_their_files(tmp_path):
    """A folder entry with a backslash (a Windows zip unpacked here), a control character or a
    ``%`` keeps a safe ``file_name``; render, the YOLO links and Label Studio's URLs still
    reach the file itself."""
    import urllib.parse

    from PIL import Image

    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import ExportFormat, run_export
    from segpipe.commands.render import render_batch
    from synthetic import box_detection, image_row, write_predictions

    photos = tmp_path / "photos"
    (photos / "d").mkdir(parents=True)
    entries = ["d\\win.jpg", "esc\x1b[31m.jpg", "line\nfeed.jpg", "50%.jpg", "a%0Ab.jpg",
               "d/%5C.jpg", "a\nb.jpg"]   # the last is named as the literal a%0Ab.jpg reads
    for k, entry in enumerate(entries):
        Image.new("RGB", (40, 30), (k * 40, 0, 0)).save(photos / entry)
    names = sources.list_images(str(photos)).column("file_name").to_pylist()
    # ordinary names are their files' own; a name that reads as an encoding is encoded too
    assert sorted(names) == sorted(["d%5Cwin.jpg", "esc%1B[31m.jpg", "line%0Afeed.jpg",
                                    "50%.jpg", "a%250Ab.jpg", "d/%255C.jpg", "a%0Ab.jpg"])
    assert [sources.original_file_name(n) for n in sorted(names)] == \
        [None, "a\nb.jpg", "a%0Ab.jpg", "d\\win.jpg", "d/%5C.jpg", "esc\x1b[31m.jpg", "line\nfeed.jpg"]
    assert [sources.original_file_name(n) for n in ("50%.jpg", "x.jpg", "%2E%2E/x.jpg")] == \
        [None, None, None]
    rows = [image_row(n, 40, 30, [box_detection(1, 0.9, 5, 5, 10, 10, 30, 40)]) for n in names]
    write_predictions(tmp_path / "run", rows)

    yolo = run_export(str(tmp_path / "run"), str(tmp_path / "yolo"), ExportOptions(0.5),
                      export_format=ExportFormat("yolo", str(photos), 0.0))
    assert (yolo["linked"], yolo["missing_images"]) == (len(entries), 0)
    for name in names:   # each link to its own file, not to one whose name reads the same
        assert os.readlink(tmp_path / "yolo" / "images" / name) == \
            str(photos / (sources.original_file_name(name) or name))
    run_export(str(tmp_path / "run"), str(tmp_path / "ls"), ExportOptions(0.5),
               export_format=ExportFormat("label-studio", "/data/"))
    urls = [t["data"]["image"] for t in json.loads((tmp_path / "ls" / "tasks.json").read_text())]
    assert sorted(urllib.parse.unquote(u)[len("/data/"):] for u in urls) == sorted(entries)

    drawn = render_batch(pa.table({"file_name": names, "width": [40] * 7, "height": [30] * 7,
                                   "detections_json": ["[]"] * 7,
                                   "rendered_name": [f"{k}.jpg" for k in range(7)]}),
                         str(photos), str(tmp_path / "gallery")).to_pylist()
    assert [row["error"] for row in drawn] == [None] * 7
    for k, name in enumerate(names):   # each drawing is of its own file
        colour = Image.open(tmp_path / "gallery" / "images" / f"{k}.jpg").getpixel((20, 15))
        own = Image.open(photos / (sources.original_file_name(name) or name)).getpixel((20, 15))
        assert abs(colour[0] - own[0]) < 8


def test_a_symlink_loop_and_links_to_listed_files_count_once(tmp_path):
    root = tmp_path / "in"
    write_photos(root / "sub", names=("chelsea", "coffee"))
    os.symlink("..", root / "sub" / "loop")                      # sub/loop -> in/
    os.symlink(root / "sub" / "chelsea.png", root / "again.png")  # the same file twice
    found = formats.list_inputs(str(root), "auto")
    assert found.listing.column("file_name").to_pylist() == ["again.png", "sub/coffee.png"]
    assert found.skipped == {
        sources.SKIPPED_LINKED_FOLDERS: ["sub/loop"],
        sources.SKIPPED_SAME_FILE: ["sub/chelsea.png (= again.png)"]}


def test_segpipe_output_folders_inside_input_are_not_inputs(tmp_path):
    root = tmp_path / "in"
    write_photos(root, names=("chelsea", "coffee"))
    ownership.mark_folder(str(root / "out"), "segment")   # segpipe's marker, not run.json
    (root / "out" / "predictions").mkdir(parents=True)
    (root / "out" / "predictions" / "part-00000.parquet").write_bytes(b"PAR1")
    ownership.mark_folder(str(root / "gallery"), "render")
    (root / "gallery" / "images").mkdir(parents=True)
    (root / "gallery" / "images" / "chelsea.jpg").write_bytes(b"\xff\xd8")
    (root / "new-out" / "predictions").mkdir(parents=True)        # an OUTPUT without run.json yet
    (root / "new-out" / "predictions" / "x.parquet").write_bytes(b"PAR1")
    found = formats.list_inputs(str(root), "auto", exclude=(str(root / "new-out"),))
    assert found.input_format == "files"   # not "mixes files, parquet inputs"
    assert found.listing.column("file_name").to_pylist() == ["chelsea.png", "coffee.png"]
    assert found.skipped[sources.SKIPPED_OUTPUT_FOLDERS] == ["gallery", "new-out", "out"]


def test_dangerous_member_names_stay_inside_every_folder(tmp_path, checkpoint, local_ray):
    """A shard whose member names climb out: rows keep safe names, and render neither reads
    the bait outside INPUT nor writes outside --to."""
    photo = write_photos(tmp_path / "photos", names=("chelsea",))[0].read_bytes()
    shards = tmp_path / "work" / "shards"
    shards.mkdir(parents=True)
    with tarfile.open(shards / "s.tar", "w") as tar:
        add(tar, "../../bait.png", photo)
        add(tar, "/abs/y.png", photo)
        add(tar, "ok.png", photo)
    (tmp_path / "work" / "bait.png").write_bytes(photo)   # what ../../bait.png would reach
    out = tmp_path / "work" / "out"
    report = run_segment(small_config(shards, out, checkpoint))
    names = sorted(r["file_name"] for p in prediction_files(str(out / "predictions"))
                   for r in pq.read_table(p, columns=["file_name"]).to_pylist())
    assert names == ["s.tar/%2E%2E/%2E%2E/bait.png", "s.tar/%2Fabs/y.png", "s.tar/ok.png"]
    assert report.accounting.complete

    # render reads the images from the shard, as the run did, and writes inside --to only
    before = {p for p in tmp_path.rglob("*")}
    gallery = tmp_path / "work" / "gallery"
    summary = run_render(RenderRequest(output=str(out), to=str(gallery),
                                       images_uri=str(shards), limit=10, score_threshold=0.05))
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(gallery in p.parents or p == gallery for p in created)
    assert summary["rendered"] == 3 and not summary["errors"]
    assert len(list((gallery / "images").rglob("*.jpg"))) == 3

    # a run of image files: a raw dangerous name (an old run, a hand-made table) is refused
    from segpipe.commands.render import render_batch

    refused = render_batch(pa.table({"file_name": ["../bait.png"], "width": [1], "height": [1],
                                     "detections_json": ["[]"], "rendered_name": ["x.jpg"]}),
                           str(shards), str(gallery)).to_pylist()
    assert "not a path inside the images folder" in refused[0]["error"]


# --- Shards that lose images -------------------------------------------------------------

def shard_bytes(members: list[tuple[str, bytes]]) -> tuple[bytes, list[tarfile.TarInfo]]:
    """A tar of ``members`` and each member's header (for its offsets)."""
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            add(tar, name, data)
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, tar.getmembers()


def read_shards(folder, names) -> dict[str, dict]:

    table = tar_shards.read_tar_shards(pa.table({"path": [str(folder / n) for n in names]}),
                                       sources.ReadOptions(str(folder), str(folder)), frozenset())
    return {r["file_name"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def three_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard-photos")
    return [p.read_bytes() for p in write_photos(folder, names=("chelsea", "coffee", "rocket"),
                                                 scale=0.2)]


def test_a_shard_cut_inside_a_member_keeps_what_came_before(tmp_path, three_photos):
    data, members = shard_bytes([(f"{i}.png", p) for i, p in enumerate(three_photos)])
    (tmp_path / "cut.tar").write_bytes(data[:members[1].offset_data + 100])
    rows = read_shards(tmp_path, ["cut.tar"])
    assert set(rows) == {"cut.tar/0.png", "cut.tar"}
    assert rows["cut.tar/0.png"]["data"] == three_photos[0]
    assert rows["cut.tar"]["source_error"].startswith(f"shard {sources.READ_CUT}")
    assert "after 1 members" in rows["cut.tar"]["source_error"]


def test_a_shard_cut_at_a_member_boundary_is_not_complete(tmp_path, three_photos):
    data, members = shard_bytes([(f"{i}.png", p) for i, p in enumerate(three_photos)])
    (tmp_path / "boundary.tar").write_bytes(data[:members[2].offset])   # headers 0 and 1 intact
    (tmp_path / "whole.tar").write_bytes(data)
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    rows = read_shards(tmp_path, ["boundary.tar", "whole.tar", "garbage.tar"])
    assert {n for n, r in rows.items() if r["source_error"] is None} == {
        "boundary.tar/0.png", "boundary.tar/1.png",
        "whole.tar/0.png", "whole.tar/1.png", "whole.tar/2.png"}
    assert "end-of-archive" in rows["boundary.tar"]["source_error"]
    assert rows["garbage.tar"]["source_error"].startswith(f"shard {sources.READ_CUT}")


@pytest.mark.parametrize("size", [9216 - 512 * k for k in range(20)])
def test_a_whole_shard_is_whole_wherever_its_end_marker_falls(tmp_path, three_photos, size):
    """tarfile reads 10,240-byte records and stops at the first zero block; where that block
    ends a record (size 9216: header 512 + 9216 = 9728, marker at 9728..10752) the second
    block was not read yet, and one whole shard in ~20 was reported cut short (seen in a run
    of 100,000 images)."""
    data, _ = shard_bytes([("0.png", three_photos[0]), ("1.png", b"x" * size)])
    (tmp_path / "whole.tar").write_bytes(data)
    rows = read_shards(tmp_path, ["whole.tar"])
    assert set(rows) == {"whole.tar/0.png", "whole.tar/1.png"}
    assert all(r["source_error"] is None for r in rows.values())


def test_mixed_samples_give_one_row_per_image_member(tmp_path, three_photos):
    data, _ = shard_bytes([("001.jpg", three_photos[0]), ("001.json", b"{}"),
                           ("002.txt", b"caption"), ("noextension", b"x"),
                           ("003.jpg", three_photos[1]), ("004.JPG", three_photos[2])])
    (tmp_path / "mixed.tar").write_bytes(data)
    rows = read_shards(tmp_path, ["mixed.tar"])
    assert set(rows) == {"mixed.tar/001.jpg", "mixed.tar/003.jpg", "mixed.tar/004.JPG"}
    assert all(r["source_error"] is None for r in rows.values())


def test_one_damaged_shard_costs_no_other_shard_an_image(tmp_path, three_photos, checkpoint,
                                                         local_ray):
    import json

    shards = tmp_path / "shards"
    shards.mkdir()
    data, members = shard_bytes([(f"{i}.png", p) for i, p in enumerate(three_photos)])
    (shards / "a-good.tar").write_bytes(data)
    (shards / "b-cut.tar").write_bytes(data[:members[2].offset_data + 10])
    mixed, _ = shard_bytes([("1.png", three_photos[0]), ("1.json", b"{}"), ("2.txt", b"x")])
    (shards / "c-mixed.tar").write_bytes(mixed)
    out = tmp_path / "out"
    report = run_segment(small_config(shards, out, checkpoint))
    statuses = {r["file_name"]: r["status"] for p in prediction_files(str(out / "predictions"))
                for r in pq.read_table(p, columns=["file_name", "status"]).to_pylist()}
    assert statuses == {"a-good.tar/0.png": "ok", "a-good.tar/1.png": "ok",
                        "a-good.tar/2.png": "ok", "b-cut.tar/0.png": "ok",
                        "b-cut.tar/1.png": "ok", "b-cut.tar": "error", "c-mixed.tar/1.png": "ok"}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["reading"] == {
        "skipped": {"tar members without an image extension": 2}, "cut_short": ["b-cut.tar"]}
    assert report.counts.ok == 6 and report.counts.errors == 1
    assert any("could not be read to their end" in line for line in report.summary_lines())


def test_a_damaged_table_costs_no_other_table_a_row(tmp_path, three_photos):

    good = pa.table({"image": three_photos[:2], "name": ["a.png", "../b.png"]})
    pq.write_table(good, tmp_path / "good.parquet", row_group_size=1)
    pq.write_table(pa.table({"image": pa.array([1, 2]), "name": ["c.png", "d.png"]}),
                   tmp_path / "numbers.parquet")
    whole = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[:len(whole) // 2])
    pq.write_table(pa.table({"other": [b"x"]}), tmp_path / "nocolumn.parquet")
    table = image_tables.read_image_tables(
        pa.table({"path": [str(tmp_path / n) for n in ("good.parquet", "numbers.parquet",
                                                        "cut.parquet", "nocolumn.parquet")]}),
        sources.ReadOptions(str(tmp_path), str(tmp_path), "image", "name"), frozenset())
    rows = {r["file_name"]: r for r in table.to_pylist()}
    assert rows["a.png"]["data"] == three_photos[0] and rows["a.png"]["source_error"] is None
    assert rows["%2E%2E/b.png"]["data"] == three_photos[1]
    assert rows["c.png"]["source_error"] == "the image column holds a int, not image bytes"
    assert rows["cut.parquet"]["source_error"].startswith(f"table {sources.READ_CUT}")
    assert "no column 'image'" in rows["nocolumn.parquet"]["source_error"]
    assert len(rows) == 6


def test_every_entry_is_a_row_or_a_counted_skip(tmp_path):
    """A name that is not UTF-8 becomes an error row (one-to-one encoded name), a broken link
    and a FIFO are counted skips (the FIFO never opened), so is a file that is no image."""
    from segpipe.io.decode import DecodeLimits, decode_batch

    root = tmp_path / "in"
    write_photos(root, names=("chelsea",))
    raw = os.fsencode(str(root)) + b"/caf\xe9%.png"
    with open(raw, "wb") as f:
        f.write((root / "chelsea.png").read_bytes())
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "README.txt").write_text("about these photos")
    found = formats.list_inputs(str(root), "auto")     # returns: the FIFO was not opened
    listing = found.listing
    assert listing.column("file_name").to_pylist() == ["caf%E9%25.png", "chelsea.png"]
    assert listing.column("source_error").to_pylist() == [sources.UNDECODABLE_NAME, None]
    assert found.skipped == {sources.SKIPPED_BROKEN_LINKS: ["broken.jpg"],
                             sources.SKIPPED_NOT_FILES: ["pipe.jpg"],
                             sources.SKIPPED_NOT_IMAGES: ["README.txt"]}
    decoded = decode_batch(listing, str(root), DecodeLimits(1 << 30, 1 << 30))
    assert decoded.column("status").to_pylist() == ["error", "ok"]
    assert decoded.column("error").to_pylist()[0] == f"read: {sources.UNDECODABLE_NAME}"

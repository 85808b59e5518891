"""segpipe from Python: the API segments Ray's own datasets exactly as the CLI does, the
predictor works in a user's own map_batches, and the README's example runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SMALL, small_config
from images import write_photos

import segpipe
from segpipe.output.run_folder import prediction_files
from segpipe.io.sources import image_id_for

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("category_id", "category_name", "score", "bbox", "area", "segmentation")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint, local_ray):
    """The same photos through the CLI's job and through ``segpipe.segment``."""
    import pyarrow.parquet as pq
    import ray

    root = tmp_path_factory.mktemp("api")
    photos = root / "photos"
    write_photos(photos, names=("chelsea", "coffee"))
    # one image per forward pass on both sides: batched kernels round differently
    segpipe.run_segment(small_config(photos, root / "out", checkpoint, batch_size=1))
    cli = {r["file_name"]: r for p in prediction_files(str(root / "out" / "predictions"))
           for r in pq.read_table(p).to_pylist()}
    config = {**SMALL, "weights": str(checkpoint), "batch_size": 1}
    decoded = segpipe.segment(ray.data.read_images(str(photos), include_paths=True),
                              config, root=str(photos)).materialize()
    return root, config, cli, decoded


def same_detections(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert {k: x[k] for k in KEYS} == {k: y[k] for k in KEYS}


def test_read_images_gives_the_clis_detections_bit_for_bit(runs):
    _, _, cli, decoded = runs
    rows = {r["file_name"]: r for r in decoded.take_all()}
    assert sorted(rows) == sorted(cli) == ["chelsea.png", "coffee.png"]   # root: the CLI's names
    for name, row in cli.items():
        same_detections(rows[name]["detections"], row["detections"])
        assert (rows[name]["width"], rows[name]["height"]) == (row["width"], row["height"])


def test_the_predictor_in_a_users_map_batches_on_file_bytes(runs):
    """``read_binary_files``' bytes, decoded as the CLI decodes files: the CLI's detections,
    the user's columns kept, and a broken file an error row, not a failed job."""
    import ray

    root, config, cli, _ = runs
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    files = [str(p) for p in sorted((root / "photos").iterdir())] + [str(root / "broken.png")]
    ds = ray.data.read_binary_files(files, include_paths=True).map_batches(
        segpipe.Predictor, fn_constructor_kwargs={"config": config}, batch_size=3,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    rows = {Path(r["path"]).name: r for r in ds.take_all()}
    assert sorted(rows) == sorted([*cli, "broken.png"])
    for name in cli:
        assert rows[name]["status"] == "ok" and "bytes" in rows[name]   # the user's columns
        same_detections(list(rows[name]["detections"]), cli[name]["detections"])
    broken = rows["broken.png"]
    assert broken["status"] == "error" and broken["error"].startswith("decode: ")
    assert list(broken["detections"]) == []


def test_a_predictors_rows_are_written_and_exported_as_they_are(runs, tmp_path, caplog):
    """``map_batches(Predictor)`` keeps the user's columns; ``write_predictions`` takes its
    rows (segpipe's columns), names relative to ``root`` are the CLI's, and the library says
    through logging what the command line says (random weights)."""
    import logging

    import ray

    root, config, cli, _ = runs
    caplog.set_level(logging.DEBUG)
    ds = ray.data.read_binary_files(str(root / "photos"), include_paths=True).map_batches(
        segpipe.Predictor, fn_constructor_kwargs={"config": {**config, "weights": "random"},
                                                  "root": str(root / "photos")},
        batch_size=2, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    predictions = segpipe.write_predictions(ds, str(tmp_path / "run"), {**config, "weights": "random"})
    assert "RANDOM WEIGHTS" in caplog.text
    names = sorted(r["file_name"] for p in prediction_files(predictions)
                   for r in pq.read_table(p, columns=["file_name"]).to_pylist())
    assert names == sorted(cli)
    result = segpipe.export(str(tmp_path / "run"), str(tmp_path / "coco"), score_threshold=0.05)
    assert result.counts.ok == 2 and result.counts.damaged_images == 0
    with pytest.raises(segpipe.ConfigError, match=r"resume=True .* overwrite=True") as refused:
        segpipe.write_predictions(ds, str(tmp_path / "run"), config)
    assert "--" not in str(refused.value)   # the API's words, not the command line's


def test_predictions_written_and_exported_as_dataclasses(runs, tmp_path):
    root, config, cli, decoded = runs
    out = tmp_path / "run"
    segpipe.write_predictions(decoded, str(out), config)
    result = segpipe.export(str(out), str(tmp_path / "coco"), score_threshold=0.5)
    assert isinstance(result, segpipe.ExportResult)
    assert isinstance(result.counts, segpipe.ExportCounts)
    assert result.instances == [str(tmp_path / "coco" / "instances.json")]   # one shard
    assert result.results == [str(tmp_path / "coco" / "results.json")]
    assert json.loads(Path(result.index).read_text())["images"] == result.counts.ok
    ours = json.loads(Path(result.instances[0]).read_text())
    theirs = json.loads((root / "out" / "coco" / "instances.json").read_text())
    assert result.counts.annotations == len(ours["annotations"]) == len(theirs["annotations"])
    assert sorted(a["segmentation"]["counts"] for a in ours["annotations"]) == \
        sorted(a["segmentation"]["counts"] for a in theirs["annotations"])
    with pytest.raises(segpipe.ConfigError, match="already holds"):   # OUTPUT's rules hold
        segpipe.write_predictions(decoded, str(out), config)


def test_the_api_leaves_no_global_state_changed_and_imports_no_torch():
    code = ("import sys, segpipe; assert 'torch' not in sys.modules and 'ray' not in "
            "sys.modules; print(sorted(segpipe.__all__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("segment", "Predictor", "export", "to_coco", "SegmentConfig"):
        assert name in result.stdout
    with pytest.raises(segpipe.ConfigError, match="unknown key"):
        segpipe.as_config({"score_treshold": 0.3})


def test_the_readmes_python_example_runs_as_written(local_ray, tmp_path, monkeypatch, capsys):
    """The README's "Use from Python" example, as written, on the module's Ray (its
    ``ray.init`` finds Ray running; a user's starts one)."""
    import ray

    text = (ROOT / "README.md").read_text().split("## Use from Python", 1)[1]
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    write_photos(tmp_path / "photos", names=("coffee",), scale=0.3)   # one small photo: quick
    monkeypatch.setenv("SEGPIPE_SAMPLES", str(tmp_path / "photos"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})
    assert "annotations in" in capsys.readouterr().out
    instances = json.loads((tmp_path / "coco" / "instances.json").read_text())
    assert [i["file_name"] for i in instances["images"]] == ["coffee.png"]   # as the CLI names it
    assert instances["images"][0]["id"] == image_id_for("coffee.png")
    # Ray warned on every small run of a pool minimum the work could not fill
    assert not [w for w in seen if "minimum number of concurrent actors" in str(w.message)]


def test_rays_columns_become_segpipes_rows_and_bad_values_error_rows():
    """Ray-free: what ``segment`` and ``Predictor`` make of each kind of reader column."""
    import io as bytes_io

    import numpy as np
    from PIL import Image

    from segpipe.api import source_rows

    png = bytes_io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png, "PNG")
    files = source_rows({"bytes": np.array([png.getvalue(), {"bytes": png.getvalue()}, 7],
                                           dtype=object),
                         "path": np.array(["a.png", "b.png", "c.png"])})
    assert files.column("file_name").to_pylist() == ["a.png", "b.png", "c.png"]
    assert files.column("source_error").to_pylist() == [
        None, None, "the bytes column holds no image bytes"]
    gray, rgba = np.full((2, 3), 9, np.uint8), np.full((2, 3, 4), 7, np.uint8)
    pixels = source_rows({"image": np.array([gray, rgba, np.zeros((2, 2), np.float32)] + [None],
                                            dtype=object)[:-1]})
    assert pixels.column("status").to_pylist() == ["ok", "ok", "error"]
    assert pixels.column("width").to_pylist() == [3, 3, None]
    assert "float32" in pixels.column("error").to_pylist()[2]


def test_no_public_name_is_also_a_module():
    """``segpipe.NAME`` must stay the API's: a subpackage of the same name, once imported,
    would take its place on the package."""
    import importlib.util

    clashing = [name for name in segpipe.__all__ if name != "__version__"
                and importlib.util.find_spec(f"segpipe.{name}") is not None]
    assert clashing == []


def test_rows_without_a_path_are_named_by_their_content_not_their_place_in_a_batch():
    """read_images without include_paths: a row's position in its batch named rows of every
    batch alike ('#0' in each), so images of different batches shared one image_id."""
    import numpy as np

    from segpipe.api import source_rows

    rng = np.random.default_rng(0)
    first = [rng.integers(0, 255, (8, 6, 3), dtype=np.uint8) for _ in range(2)]
    second = [rng.integers(0, 255, (8, 6, 3), dtype=np.uint8), first[0].copy()]
    names = [source_rows({"image": np.stack(batch)}).column("file_name").to_pylist()
             for batch in (first, second)]
    assert len({*names[0], names[1][0]}) == 3          # three pictures, three names
    assert names[1][1] == names[0][0]                 # the same picture: the same name
    flipped = source_rows({"image": np.stack([first[0].reshape(6, 8, 3)])})
    assert flipped.column("file_name").to_pylist() != names[0][:1]   # same bytes, other shape
    data = source_rows({"bytes": np.array([b"abc", b"abd"], dtype=object)})
    assert len(set(data.column("file_name").to_pylist())) == 2

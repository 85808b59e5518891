"""``segpipe render``: draw a run's detections on the original images and write a gallery.

Draws what the classic tutorial draws: each instance's mask in its own colour at 50% opacity,
its box, and its class name with score (box-only runs: boxes and labels). Drawing runs in Ray
Data tasks, reading the images the way the run read them (image files by name; tar shards and
Parquet tables through their format's reader (``formats.INPUT_FORMATS``), one task per shard or table)
and decoding them like the segment job, EXIF included;
``index.html`` shows every rendered image with per-class counts and a score histogram.
Rendered images are JPEGs named like their inputs with a ``.jpg`` extension, always inside the
target folder.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import json
import posixpath
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from segpipe import schema
from segpipe.config import ConfigError
from segpipe.io import formats, lease, ownership, sources, storage
from segpipe.io.decode import DecodeError, DecodeLimits, decode_image, pillow_open
from segpipe.model.settings import RunSettings
from segpipe.model.weights import RANDOM_WEIGHTS_NOTE
from segpipe.output import run_folder
from segpipe.output.damage import DAMAGED, DAMAGED_KEY, damaged_image_notes, mark_damaged_images
from segpipe.output.predictions import checked_rows, predictions_dataset
from segpipe.progress import Progress

MASK_OPACITY = 0.5
HISTOGRAM_BINS = 20


IMAGES_DIR = "images"


def instance_colour(index: int) -> tuple[int, int, int]:
    """A distinct, bright colour for the ``index``-th instance of an image (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


#: A label's height as a share of the image's longer side: about 11 px in the gallery's
#: 320-px thumbnails, whatever the image's size.
LABEL_SHARE = 1 / 30


def draw_detections(rgb: np.ndarray, detections: list[dict]) -> Image.Image:
    """The image with each detection's mask (50% opacity), box and ``name score`` label, the
    labels and lines sized to the image so that a thumbnail still shows them."""
    from PIL import ImageFont
    from pycocotools import mask as mask_utils

    canvas = rgb.astype(np.float32)
    for i, det in enumerate(detections):
        if det.get("segmentation") is None:
            continue  # box-only detector: the box below is all there is
        mask = mask_utils.decode(det["segmentation"]).astype(bool)
        fill = np.array(instance_colour(i), np.float32)
        canvas[mask] = canvas[mask] * (1 - MASK_OPACITY) + fill * MASK_OPACITY
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    longer = max(image.size)
    font = ImageFont.load_default(size=max(12, round(longer * LABEL_SHARE)))
    line = max(2, round(longer / 320))
    for i, det in enumerate(detections):
        x, y, w, h = det["bbox"]
        colour = instance_colour(i)
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
        label = f"{det['category_name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = max(0, y - bottom - 2 * line)
        draw.rectangle([x, ty, x + right + 2 * line, ty + bottom + line], fill=colour)
        draw.text((x + line, ty), label, fill=(0, 0, 0), font=font)
    return image


def rendered_names(file_names: list[str]) -> dict[str, str]:
    """The path under ``images/`` of each rendered image, one to one (letter case aside, so
    that case-insensitive disks keep them apart too): the input's relative path with a
    ``.jpg`` extension (``a/cat.png`` → ``a/cat.jpg``; ``cat.jpg`` stays). Where two inputs
    would share a name (``cat.png`` and ``cat.jpg``; ``x\\y.jpg`` and ``x/y.jpg``), the one
    already so named keeps it and the other keeps its own extension (``cat.png.jpg``), or
    failing that gets a hash of its name. Names never leave the folder (``..`` and leading
    ``/`` are dropped) and no part is longer than ``MAX_NAME_BYTES``."""
    def safe(name: str) -> str:
        return posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/") or "image"

    def jpg(name: str) -> str:
        stem, ext = posixpath.splitext(name)
        return name if ext.lower() in (".jpg", ".jpeg") else stem + ".jpg"

    def hashed(name: str, target: str) -> str:
        stem, ext = posixpath.splitext(target)
        tag = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
        return short(f"{stem}~{tag}{ext}")

    preferred = {name: short(jpg(safe(name))) for name in file_names}
    wanted: dict[str, int] = {}
    for target in preferred.values():
        wanted[target.lower()] = wanted.get(target.lower(), 0) + 1
    names: dict[str, str] = {}
    kept: set[str] = set()
    for name in sorted(file_names):   # first those whose name is theirs alone, or their own
        target = preferred[name]
        if (wanted[target.lower()] == 1 or target == name) and target.lower() not in kept:
            names[name] = target
            kept.add(target.lower())
    used = kept | set(wanted)
    for name in sorted(set(file_names) - set(names)):
        target = short(safe(name) + ".jpg")
        if target.lower() in used:
            target = hashed(name, preferred[name])
        names[name] = target
        used.add(target.lower())
    return names


#: The longest part of a rendered image's path, in bytes (a disk allows 255 for a name, and
#: the temporary name while it is written adds to it).
MAX_NAME_BYTES = 200


def short(path: str) -> str:
    """``path`` with every part over ``MAX_NAME_BYTES`` cut, keeping its extension and adding
    a hash of the whole part, so that cut names stay distinct."""
    parts = []
    for part in path.split("/"):
        raw = part.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_NAME_BYTES:
            stem, ext = posixpath.splitext(part)
            tag = hashlib.blake2b(raw, digest_size=4).hexdigest()
            keep = stem.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES - 32]
            part = keep.decode("utf-8", "ignore") + f"~{tag}{ext[:16]}"
        parts.append(part)
    return "/".join(parts)


def _draw(row: dict, data: Optional[bytes], out_fs, out_root: str) -> Optional[str]:
    """Draw ``row``'s detections on the image ``data`` and write it under ``images/``; return
    the reason it could not be drawn, or None."""
    limits = DecodeLimits(max_pixels=178_956_970, max_bytes=1 << 31)
    try:
        if data is None:
            raise DecodeError("no image bytes")
        rgb = decode_image(data, limits)
        if (rgb.shape[1], rgb.shape[0]) != (row["width"], row["height"]):
            raise DecodeError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, predictions were "
                              f"made on {row['width']}x{row['height']}")
        image = draw_detections(rgb, json.loads(row["detections_json"]))
        path = storage.join(out_root, IMAGES_DIR, row["rendered_name"])
        out_fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with storage.atomic_output(out_fs, path) as stream:
            image.save(stream, "JPEG", quality=90, comment=ownership.RENDER_COMMENT)
    except (DecodeError, OSError) as exc:
        return str(exc)
    return None


def _read_image(fs: pafs.FileSystem, root: str, file_name: str) -> bytes:
    """The bytes of the image file ``file_name`` names under ``root``: the file it was encoded
    from (``sources.original_file_name``: ``a%5Cb.jpg`` names ``a\\b.jpg``), else the file
    of that name."""
    original = sources.original_file_name(file_name)
    return storage.read_bytes(fs, storage.join(root, original or file_name))


def render_batch(batch: pa.Table, images_uri: str, to: str) -> pa.Table:
    """Ray Data stage for a run of image files: draw each row's detections on its image
    (``images_uri/<file_name>``) and write ``to/images/...``."""
    in_fs, in_root = storage.resolve(images_uri)
    out_fs, out_root = storage.resolve(to)
    errors: list[Optional[str]] = []
    for row in batch.to_pylist():
        name = row["file_name"]
        if name.startswith("/") or {"", ".", ".."} & set(name.split("/")):
            errors.append(f"{name!r} is not a path inside the images folder")
            continue
        try:
            data = _read_image(in_fs, in_root, name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        errors.append(_draw(row, data, out_fs, out_root))
    return pa.table({"file_name": batch.column("file_name"), "error": pa.array(errors, pa.string())})


def render_from_sources(batch: pa.Table, images_uri: str, to: str, input_format: str,
                        image_column: str, name_column: Optional[str]) -> pa.Table:
    """Ray Data stage for a run of tar shards or Parquet tables: read the shards or tables
    named in ``sources`` (with their format's reader, as the run read them)
    and draw the rows whose images they hold."""
    import tarfile

    fs, root = storage.resolve(images_uri)
    out_fs, out_root = storage.resolve(to)
    reader = formats.input_format(input_format).images
    assert reader is not None
    options = sources.ReadOptions(images_uri, root, image_column, name_column)
    wanted = {row["file_name"]: row for row in batch.to_pylist()}
    errors: dict[str, Optional[str]] = {}
    failures: list[str] = []
    for path in json.loads(batch.column("sources")[0].as_py()):
        label = sources.safe_file_name(sources.relative_name(path, root))
        try:
            for name, data in reader(fs, path, label, options):
                if name is not None and name in wanted and name not in errors:
                    errors[name] = _draw(wanted[name], data, out_fs, out_root)
                if len(errors) == len(wanted):
                    break
        except (tarfile.TarError, OSError, EOFError, ValueError, pa.ArrowException) as exc:
            failures.append(f"{label}: {exc}")
    missing = "not found in the shards or tables of --images" + (
        f" ({'; '.join(failures)})" if failures else "")
    names = batch.column("file_name").to_pylist()
    return pa.table({"file_name": batch.column("file_name"),
                     "error": pa.array([errors.get(n, missing) for n in names], pa.string())})


def source_blocks(rows: pa.Table, found: sources.InputFiles,
                  input_format: str) -> list[pa.Table]:
    """``rows`` cut into blocks by the shard or table that holds each image, each block with
    a ``sources`` column (JSON list of the paths to read): a tar member's shard is in its name,
    a table row's too when it is named ``<table>#<hash>``; rows named by a name column may be
    in any table, so their block reads all of them."""
    chosen = formats.input_format(input_format)
    assert chosen.suffix is not None
    paths = {sources.safe_file_name(sources.relative_name(f.path, found.root)): f.path
             for f in found.files if f.path.lower().endswith(chosen.suffix)}
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(rows.column("file_name").to_pylist()):
        holder = next((label for label in sorted(paths, key=len, reverse=True)
                       if name.startswith(label + chosen.separator)), None)
        groups.setdefault(holder or "", []).append(index)
    blocks = []
    for holder, indices in groups.items():
        read = [paths[holder]] if holder else sorted(paths.values())
        block = rows.take(indices)
        blocks.append(block.append_column("sources", pa.array([json.dumps(read)] * len(indices))))
    return blocks


def select_rows(predictions_dir: str, limit: int, score_threshold: float,
                classes: Optional[frozenset[int]], settings: RunSettings,
                file_names: Optional[list[str]] = None) -> tuple[pa.Table, list[str]]:
    """The first ``limit`` ok images by file_name (or the ok ones of ``file_names``, in that
    order), with the detections to draw as JSON and the name each is rendered under; and a
    line for each image or detection left out as damaged in predictions/ (``io.damage``)."""
    dataset = predictions_dataset(predictions_dir)
    if file_names is None:
        names = (dataset.to_table(columns=["file_name"], filter=pc.field("status") == schema.STATUS_OK)
                 .column("file_name").to_pylist())
        chosen = set(sorted(names)[:limit])
    else:
        chosen = set(file_names)
    table = dataset.to_table(columns=["file_name", "width", "height", "status", "error", "detections"],
                             filter=pc.field("file_name").isin(list(chosen)))
    marked = mark_damaged_images(table.drop_columns(["detections"]))
    _, damaged = damaged_image_notes(marked)
    table = table.filter(pc.invert(pc.starts_with(pc.fill_null(marked.column("error"), ""), DAMAGED)))
    rows = []
    for row in checked_rows(table, settings):
        damaged += [line or "(another damaged detection)" for line in row.get(DAMAGED_KEY, [])]
        dets = [{k: d[k] for k in ("category_id", "category_name", "score", "bbox", "segmentation")}
                for d in row["detections"] or []
                if d["score"] >= score_threshold and (d["area"] is None or d["area"] > 0)
                and d["category_id"] in settings.categories.ids
                and (classes is None or d["category_id"] in classes)]
        rows.append({"file_name": row["file_name"], "width": row["width"], "height": row["height"],
                     "detections_json": json.dumps(dets)})
    names = rendered_names([r["file_name"] for r in rows])
    for r in rows:
        r["rendered_name"] = names[r["file_name"]]
    if not rows:
        return pa.table({}), damaged
    if file_names is None:
        return pa.Table.from_pylist(rows).sort_by("file_name"), damaged
    position = {name: k for k, name in enumerate(file_names)}
    return pa.Table.from_pylist(sorted(rows, key=lambda r: position[r["file_name"]])), damaged


def gallery_html(rows: list[dict], errors: dict[str, str], title: str,
                 captions: Optional[dict[str, str]] = None, note: Optional[str] = None) -> str:
    """``index.html``: ``note`` (random weights) as a banner, per-class counts, a score
    histogram with its axes named, and every rendered image (in the order of ``rows``, linked
    at full size, with its detections counted and its caption from ``captions``)."""
    per_class: Counter = Counter()
    scores = []
    for row in rows:
        for det in json.loads(row["detections_json"]):
            per_class[det["category_name"]] += 1
            scores.append(det["score"])
    bins = np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] if scores else \
        np.zeros(HISTOGRAM_BINS, int)
    top = max(int(bins.max()), 1)
    bars = "".join(
        f'<rect x="{40 + i * 20}" y="{10 + 100 - 100 * n / top:.1f}" width="18" '
        f'height="{100 * n / top:.1f}"><title>scores {i / HISTOGRAM_BINS:.2f}–'
        f"{(i + 1) / HISTOGRAM_BINS:.2f}: {n} detections</title></rect>"
        for i, n in enumerate(bins.tolist()))
    width = 40 + 20 * HISTOGRAM_BINS
    axes = (f'<line x1="38" y1="110" x2="{width}" y2="110" stroke="#333"/>'
            '<line x1="38" y1="10" x2="38" y2="110" stroke="#333"/>'
            f'<text x="34" y="16" font-size="10" text-anchor="end">{top}</text>'
            '<text x="34" y="112" font-size="10" text-anchor="end">0</text>'
            '<text x="40" y="124" font-size="10">0</text>'
            f'<text x="{40 + 10 * HISTOGRAM_BINS}" y="124" font-size="10" text-anchor="middle">0.5</text>'
            f'<text x="{width}" y="124" font-size="10" text-anchor="end">1</text>'
            f'<text x="{40 + 10 * HISTOGRAM_BINS}" y="140" font-size="11" text-anchor="middle">'
            "detection score</text>"
            '<text x="10" y="60" font-size="11" text-anchor="middle" transform="rotate(-90 10 60)">'
            "detections</text>")
    class_rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{n}</td></tr>"
                         for name, n in per_class.most_common())
    tiles = []
    for row in rows:
        name = row["file_name"]
        href = urllib.parse.quote("images/" + row["rendered_name"])
        count = len(json.loads(row["detections_json"]))
        caption = (captions or {}).get(name)
        extra = f"<br>{html.escape(caption)}" if caption else ""
        if name in errors:
            tiles.append(f'<figure class="err"><figcaption>{html.escape(name)}: '
                         f"{html.escape(errors[name])}</figcaption></figure>")
        else:
            tiles.append(f'<figure><a href="{href}" title="open at full size"><img src="{href}" '
                         f'loading="lazy"></a><figcaption>{html.escape(name)} · '
                         f"{count} detection{'s' if count != 1 else ''} drawn · "
                         f'<a href="{href}">full size</a>{extra}</figcaption></figure>')
    banner = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;margin:4px;width:320px;
vertical-align:top}} img{{max-width:320px;max-height:320px}} figcaption{{font-size:12px;
overflow-wrap:anywhere}} .err{{color:#b00}} .note{{background:#b00;color:#fff;padding:.5em 1em;
font-weight:bold}} svg rect{{fill:#4a7}} table{{border-collapse:collapse}}
td{{padding:0 1em 0 0}}</style></head><body>
<h1>{html.escape(title)}</h1>
{banner}
<p>{len(rows)} images, {len(scores)} instances drawn (score at least the threshold asked).</p>
<h2>Instances per class</h2><table>{class_rows}</table>
<h2>Score histogram</h2>
<svg width="{width + 10}" height="145" viewBox="0 0 {width + 10} 145">{axes}{bars}</svg>
<h2>Images</h2>
{"".join(tiles)}
</body></html>
"""


@dataclass
class RenderRequest:
    """What ``segpipe render`` was asked, checked against the run before Ray starts."""

    output: str
    images_uri: str
    to: str
    limit: int = 100
    score_threshold: float = 0.5
    classes: Optional[str] = None   # names or ids, comma-separated
    address: Optional[str] = None
    file_names: Optional[list[str]] = None   # these images, in this order (not the first by name)
    captions: Optional[dict[str, str]] = None   # a line under each image, by file_name
    title: Optional[str] = None


@dataclass
class CheckedRender:
    predictions_dir: str
    rows: pa.Table
    title: str
    images: sources.InputFiles           # the files of --images, listed once
    input_format: str = "files"          # how --images holds the images: files | tar | parquet
    image_column: str = "image"          # parquet: the columns the run read
    name_column: Optional[str] = None
    damaged: list[str] = field(default_factory=list)   # left out as damaged (select_rows)
    random_weights: bool = False                        # the run used --weights random


def check_render(request: RenderRequest) -> CheckedRender:
    """Everything ``render`` can check without Ray: the run, the images, the target folder,
    the thresholds and classes. Raises ``ConfigError`` saying what to fix."""
    if request.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if not 0.0 <= request.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold must be in [0, 1], got {request.score_threshold}")
    predictions_dir = run_folder.existing_predictions(request.output)
    settings = run_folder.read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    if request.score_threshold < settings.model.score_floor:
        raise ConfigError(f"score threshold {request.score_threshold} is below the stored score "
                          f"floor {settings.model.score_floor}")
    classes = (settings.categories.parse_classes(request.classes)
               if request.classes is not None else None)
    fs, root = storage.resolve(request.images_uri)
    if not storage.exists(fs, root):
        raise ConfigError(f"--images {request.images_uri} does not exist (give the INPUT the "
                          "run segmented)")
    found = sources.input_files(request.images_uri)
    input_format = formats.detect_input_format(request.images_uri, found)
    run_folder.check_folder_target(request.to, "--to")
    run_folder.check_target(request.to, "--to", request.output,
                            (run_folder.run_input(request.output), request.images_uri))
    rows, damaged = select_rows(predictions_dir, request.limit, request.score_threshold, classes,
                                settings, request.file_names)
    if rows.num_rows == 0:
        raise ConfigError(f"{request.output} has no successfully predicted image to render")
    check_render_target(request.to, rows.column("rendered_name").to_pylist())
    image_column, name_column = _table_columns(request.output)
    return CheckedRender(predictions_dir, rows, request.title or f"segpipe: {request.output}",
                         found, input_format, image_column, name_column, damaged,
                         settings.random_weights)


RENDER_FILES = ("index.html", "render.json")


def check_render_target(to: str, rendered: list[str]) -> None:
    """Refuse to draw into ``to`` over files segpipe did not write: ``index.html`` and
    ``render.json`` must be in its ledger, an image under ``images/`` must carry render's JPEG
    comment; nothing on the way may be a link (``ownership``)."""
    ownership.refuse_links(to, [IMAGES_DIR, run_folder.LOGS_DIR], "render writes there")
    lease.check_free(to, what="--to")
    ownership.check_replaceable(to, RENDER_FILES)
    fs, root = storage.resolve(to)
    foreign = []
    for name in rendered:
        path = storage.join(root, IMAGES_DIR, name)
        if ownership.linked_part(to, f"{IMAGES_DIR}/{name}") is not None:
            foreign.append(path)
        elif storage.exists(fs, path) and not _drawn_by_render(fs, path):
            foreign.append(path)
    if foreign:
        raise ownership.refusal(foreign, to, "replace")


def _drawn_by_render(fs, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f, pillow_open(f) as image:
            return image.format == "JPEG" and image.info.get("comment") == ownership.RENDER_COMMENT
    except Exception:   # not an image Pillow reads: not render's
        return False


def _table_columns(output: str) -> tuple[str, Optional[str]]:
    """The image and name columns the run read Parquet tables with (its run.json)."""
    config = run_folder.recorded_config(output)
    return config.get("image_column") or "image", config.get("name_column")


def run_render(request: RenderRequest, checked: Optional[CheckedRender] = None,
               show_progress: bool = False) -> dict:
    """Render up to ``request.limit`` images of a run into ``request.to`` on Ray."""
    checked = checked or check_render(request)
    ownership.mark_folder(request.to, "render")
    with lease.holding(request.to, "--to"):   # one writer at a time, as for segment
        return _render(request, checked, show_progress)


def _render(request: RenderRequest, checked: CheckedRender, show_progress: bool) -> dict:
    import ray

    from segpipe.cluster.session import ray_session

    table, to = checked.rows, request.to
    # index.html and render.json, written last, say the gallery is whole: a killed render
    # leaves neither beside drawings of two renders
    ownership.remove_recorded(to, list(RENDER_FILES))
    with ray_session(request.address):
        if checked.input_format == "files":
            blocks = [table.slice(i, 8) for i in range(0, table.num_rows, 8)]
            dataset = ray.data.from_arrow(blocks).map_batches(
                render_batch, fn_kwargs={"images_uri": request.images_uri, "to": to},
                batch_size=8, batch_format="pyarrow")
        else:   # one task per shard or table, reading it once for all its rows
            dataset = ray.data.from_arrow(
                source_blocks(table, checked.images, checked.input_format)).map_batches(
                render_from_sources, batch_size=None, batch_format="pyarrow",
                fn_kwargs={"images_uri": request.images_uri, "to": to,
                           "input_format": checked.input_format,
                           "image_column": checked.image_column,
                           "name_column": checked.name_column})
        outcomes = []
        with Progress("rendering", table.num_rows, enabled=show_progress) as progress:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                outcomes.append(batch)
                failed = sum(e is not None for e in batch.column("error").to_pylist())
                progress.advance(batch.num_rows, failed)
        outcome = pa.concat_tables(outcomes)
    errors = {n: e for n, e in zip(outcome.column("file_name").to_pylist(),
                                   outcome.column("error").to_pylist()) if e}
    rows = table.to_pylist()
    fs, root = storage.resolve(to.rstrip("/"))
    storage.write_bytes_atomic(fs, storage.join(root, RENDER_FILES[0]),
                               gallery_html(rows, errors, checked.title, request.captions,
                                            RANDOM_WEIGHTS_NOTE if checked.random_weights else None).encode())
    ownership.record_written(to, [RENDER_FILES[0]])
    summary = {"rendered": len(rows) - len(errors), "errors": errors,
               "damaged": checked.damaged, "random_weights": checked.random_weights,
               "index": storage.join(root, RENDER_FILES[0])}
    ownership.write_json(to, RENDER_FILES[1], summary)
    return summary

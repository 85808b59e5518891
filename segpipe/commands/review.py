"""``segpipe review``: rank a run's images for a person's attention (``review``), write the
ranking, and on request the top images as a COCO or Label Studio subset and a gallery."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Optional

import pyarrow as pa

from segpipe.annotations.selection import ExportOptions
from segpipe.config import ConfigError
from segpipe.io import lease, ownership, storage
from segpipe.output.run_folder import (
    LOGS_DIR,
    check_folder_target,
    check_target,
    existing_predictions,
    read_run_settings,
    run_input,
)
from segpipe.review import signals
from segpipe.version import __version__

REVIEW_FILES = ("review.jsonl", "review.csv", "review.json")
SUBSET_DIR = "top"
GALLERY_DIR = "gallery"


@dataclass(frozen=True)
class ReviewRequest:
    """What ``segpipe review`` was asked."""

    output: str
    to: str
    score_threshold: float = 0.5
    margin: float = signals.DEFAULT_MARGIN
    top: Optional[int] = None            # images in the subset and gallery
    subset: Optional[str] = None         # coco | label-studio: the top images as that format
    image_root: Optional[str] = None     # label-studio subset: where Label Studio finds images
    images: Optional[str] = None         # the run's INPUT: draw a gallery of the top images


def check_review(request: ReviewRequest):
    """``ConfigError`` for a request that cannot be answered; returns the run's predictions
    folder and settings."""
    predictions_dir = existing_predictions(request.output)
    settings = read_run_settings(predictions_dir)
    if settings is None:
        raise ConfigError(f"{predictions_dir} has no segpipe run settings in its metadata")
    if not settings.model.score_floor <= request.score_threshold < 1.0:
        raise ConfigError(f"--score-threshold must be in [{settings.model.score_floor}, 1) (the "
                          f"run kept detections down to {settings.model.score_floor}), got "
                          f"{request.score_threshold}")
    if not 0.0 < request.margin <= 1.0:
        raise ConfigError(f"--margin must be in (0, 1], got {request.margin}")
    if request.top is not None and request.top < 1:
        raise ConfigError("--top must be at least 1")
    if request.subset is not None:
        if request.subset not in ("coco", "label-studio"):
            raise ConfigError(f"--subset must be coco or label-studio, got {request.subset!r}")
        if request.top is None:
            raise ConfigError("--subset needs --top K: how many of the first images it holds")
        if request.subset == "label-studio" and not request.image_root:
            raise ConfigError("--subset label-studio needs --image-root (where Label Studio finds "
                              "the images)")
    check_folder_target(request.to, "--to", " (review writes review.jsonl, review.csv, "
                                            "review.json, top/ and gallery/ into it)")
    check_target(request.to, "--to", request.output, (run_input(request.output), request.images))
    ownership.refuse_links(request.to, [SUBSET_DIR, GALLERY_DIR, LOGS_DIR],
                           "review writes its subset, gallery and log there")
    lease.check_free(request.to, what="--to")
    ownership.check_replaceable(request.to, REVIEW_FILES)
    if request.subset:
        from segpipe.commands.export import check_export_target

        check_export_target(storage.join(request.to, SUBSET_DIR), request.subset)
    if request.images:
        fs, root = storage.resolve(request.images)
        if not storage.exists(fs, root):
            raise ConfigError(f"--images {request.images} does not exist (give the INPUT the run "
                              "segmented)")
    return predictions_dir, settings


def run_review(request: ReviewRequest, show_progress: bool = False,
               checked: Optional[tuple] = None) -> dict:
    """Score, rank and write, after ``check_review`` (``checked``: its result, when the caller
    ran it); returns the summary written to ``review.json``."""
    predictions_dir, settings = checked or check_review(request)
    ownership.mark_folder(request.to, "review")
    with lease.holding(request.to, "--to"):   # one writer at a time, as for segment
        return _review(request, predictions_dir, settings, show_progress)


def _review(request: ReviewRequest, predictions_dir: str, settings, show_progress: bool) -> dict:
    from segpipe.commands.export import EXPORT_JSON
    from segpipe.commands.render import RENDER_FILES
    from segpipe.review.queue import rank, ranked_records, score_images, write_ranking

    signal_settings = signals.SignalSettings(request.score_threshold, request.margin)
    # review.json, written last, says a review finished; the gallery's and the subset's own
    # records go with it, so that a killed review leaves no earlier one looking whole
    ownership.remove_recorded(request.to, [REVIEW_FILES[2]])
    ownership.remove_recorded(storage.join(request.to, GALLERY_DIR), list(RENDER_FILES))
    ownership.remove_recorded(storage.join(request.to, SUBSET_DIR), [EXPORT_JSON])
    start = time.perf_counter()
    scored = score_images(predictions_dir, settings, signal_settings)
    ranked = rank(scored.table)
    names = write_ranking(request.to, ranked, settings, signal_settings, scored.kept_per_category)
    ownership.record_written(request.to, names)
    top = ranked.slice(0, request.top) if request.top else ranked.slice(0, 0)
    first = list(ranked_records(ranked.slice(0, 10), settings, signal_settings,
                                scored.kept_per_category))
    summary: dict = {
        "segpipe": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": request.output, "asked": asdict(request),
        "images": ranked.num_rows, "random_weights": settings.random_weights,
        "signals": {name: _described(ranked, name) for name in signals.SIGNALS},
        "damaged": {"images": scored.counts.damaged_images,
                    "detections": scored.counts.damaged_left_out, "named": scored.counts.damaged},
        "first": first,
    }
    if request.subset:
        summary["subset"] = _write_subset(request, predictions_dir, settings, top, signal_settings,
                                          scored.kept_per_category)
    if request.images:
        summary["gallery"] = _draw_gallery(request, request.images,
                                           top if request.top else ranked.slice(0, 100),
                                           settings, signal_settings, scored.kept_per_category,
                                           show_progress)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    ownership.write_json(request.to, REVIEW_FILES[2], summary)
    return summary


def _described(ranked: pa.Table, name: str) -> dict:
    """How a signal is spread over the run: mean, images over 0.05, max."""
    values = ranked.column(name).to_numpy()
    if not values.size:
        return {"mean": 0.0, "images_over_0.05": 0, "max": 0.0}
    return {"mean": round(float(values.mean()), 4), "images_over_0.05": int((values > 0.05).sum()),
            "max": round(float(values.max()), 4)}


def _write_subset(request: ReviewRequest, predictions_dir: str, settings, top: pa.Table,
                  signal_settings, kept_per_category) -> dict:
    """The top images as COCO (in ``file_name`` order) or Label Studio tasks (in rank order,
    each with its rank, priority and reasons in its data) in ``to/top``."""
    from segpipe.review.queue import ranked_records

    to = storage.join(request.to, SUBSET_DIR)
    options = ExportOptions(score_threshold=request.score_threshold)
    ownership.mark_folder(to, "export")
    images = top.select(["image_id", "file_name", "width", "height", "status", "error",
                         "file_index", "row_index"])
    if request.subset == "coco":
        from segpipe.coco.writer import export_coco

        counts = export_coco(predictions_dir, to, options, settings, images=images.sort_by("file_name"),
                             shard_images=0)
    else:
        from segpipe.labels.label_studio import export_label_studio

        about = {r["image_id"]: {"review_rank": r["rank"], "review_priority": r["priority"],
                                 "review_reasons": "; ".join(r["reasons"])}
                 for r in ranked_records(top, settings, signal_settings, kept_per_category)}
        counts, _ = export_label_studio(predictions_dir, to, options, settings,
                                        request.image_root or "", images=images,
                                        extra=lambda row: about[row["image_id"]])
    return {"format": request.subset, "folder": to, "images": counts.ok,
            "annotations": counts.annotations}


def _draw_gallery(request: ReviewRequest, images: str, top: pa.Table, settings, signal_settings,
                  kept_per_category, show_progress: bool) -> dict:
    """Draw the top images, read from ``images`` (the run's INPUT), in rank order into
    ``to/gallery`` (``render``), each captioned with its rank and reasons."""
    from segpipe.commands.render import RenderRequest, check_render, run_render
    from segpipe.review.queue import ranked_records

    captions = {r["file_name"]: f"#{r['rank']} priority {r['priority']:.2f}: " + "; ".join(r["reasons"])
                for r in ranked_records(top, settings, signal_settings, kept_per_category)}
    render = RenderRequest(request.output, images, storage.join(request.to, GALLERY_DIR),
                           limit=max(1, top.num_rows), score_threshold=request.score_threshold,
                           file_names=top.column("file_name").to_pylist(), captions=captions,
                           title=f"segpipe review: {request.output}")
    summary = run_render(render, check_render(render), show_progress=show_progress)
    return {"index": summary["index"], "rendered": summary["rendered"],
            "errors": len(summary["errors"])}

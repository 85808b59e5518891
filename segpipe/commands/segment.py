"""The segment job: sources → decode → predictor pool → encode (``pipeline``) → Parquet on Ray Data.

``run_segment`` takes what ``preflight.check_segment`` found (config, input, output, weights
and categories files, checked before torch or Ray), resolves the weights and their classes,
runs the Ray Data pipeline, then writes the COCO files and the run manifest from what landed
in ``predictions/`` and checks that every listed input came out exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from segpipe import schema
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.cluster.plan import fit_pool_to_unknown_work, fit_pool_to_work, plan_stages
from segpipe.cluster.session import ray_session
from segpipe.cluster.shape import ClusterWatch, read_cluster_shape
from segpipe.coco.writer import export_coco
from segpipe.commands import report
from segpipe.commands.preflight import CheckedRun, check_segment
from segpipe.config import ConfigError, SegmentConfig
from segpipe.console import interrupt_flag
from segpipe.io import formats, ownership, sources
from segpipe.io.lease import Lease
from segpipe.io.lease import acquire as acquire_lease
from segpipe.model.resolved import ResolvedWeights, resolve_weights
from segpipe.model.settings import RunSettings
from segpipe.model.spec import ModelSpec
from segpipe.output import run_folder, sinks
from segpipe.output.predictions import read_image_table
from segpipe.pipeline import build_dataset, run_settings, stage_figures
from segpipe.progress import Progress, RunMonitor

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_progress_bars(enabled: bool) -> Iterator[None]:
    """Ray Data's own progress bars on or off while the block runs, as they were after."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = enabled
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


@dataclass
class OutputPlan:
    """What a run will do to OUTPUT, decided and checked but not yet done (``plan_output``):
    the predictions folder, the images done in it, the settings to write with, and the files
    of segpipe's it will remove (``clear_output``)."""

    predictions_dir: str
    done: set[int]
    settings: RunSettings
    temporary: list[str]   # a killed run's temporary files
    replaced: list[str]    # with --overwrite: the earlier run's complete files


def plan_output(config: SegmentConfig, settings: RunSettings) -> OutputPlan:
    """Check OUTPUT for this run and plan what it changes there, changing nothing.

    A fresh run refuses an OUTPUT that holds predictions, or will clear it with ``overwrite``
    (segpipe's own files only: ``run_folder.check_output`` refuses anything else). With
    ``resume`` the complete files of an earlier run are kept (their images are skipped) after
    checking that they were made with the same settings; a run made before soft masks were
    stored as uint16 goes on storing them as uint8, so one run's files agree.
    """
    predictions_dir = run_folder.predictions_dir(config.output_path)
    # segpipe's own files only (ownership): anything else there is refused, not removed
    complete, temporary = run_folder.check_output(config.output_path, config.resume, config.overwrite)
    if not config.resume:
        return OutputPlan(predictions_dir, set(), settings, temporary, complete)
    earlier, done = run_folder.read_written(predictions_dir)
    if earlier is not None and earlier.soft_mask_dtype == schema.SOFT_MASK_DTYPE_BEFORE:
        settings = replace(settings, soft_mask_dtype=earlier.soft_mask_dtype)
    if earlier is not None:   # recorded since; the weights themselves are compared by sha
        settings = replace(settings, random_weights=earlier.random_weights)
    differences = settings.differences(earlier) if earlier is not None else []
    if differences:
        raise ConfigError(f"cannot resume {config.output}: its predictions were made with "
                          f"other settings ({', '.join(differences)}); resume with the "
                          "same settings, or use --overwrite")
    return OutputPlan(predictions_dir, done, settings, temporary, [])


def check_resumed_input(config: SegmentConfig, listing: Optional[pa.Table],
                        done: set[int]) -> None:
    """``ConfigError`` when images a resumed run has done are not under INPUT: another folder
    given by mistake would be segmented into this run (all of it), and the run's accounting
    fail at its end. Inputs known only as they are read (shards, tables) are not checked."""
    if not done or listing is None:
        return
    done_ids = pa.array(np.fromiter(done, np.int64, len(done)))
    elsewhere = int(pc.sum(pc.invert(pc.is_in(done_ids, value_set=listing.column("image_id"))))
                    .as_py() or 0)
    if elsewhere:
        raise ConfigError(f"cannot resume {config.output}: {elsewhere} of the {len(done)} images "
                          f"in its predictions/ are not under INPUT {config.input}; resume with "
                          "the INPUT that run read, or start again with --overwrite")


def clear_output(config: SegmentConfig, plan: OutputPlan) -> None:
    """Do what ``plan`` decided, once nothing can refuse the run any more: remove the earlier
    run.json and coco/ (``run_folder.retire_finished_run``), a killed run's temporary files
    and, with ``overwrite``, the earlier run's predictions."""
    run_folder.retire_finished_run(config.output_path)   # written again when this run finishes
    ownership.remove(plan.predictions_dir, plan.temporary)
    if not config.resume:
        ownership.remove(plan.predictions_dir, plan.replaced)
        ownership.record_written(plan.predictions_dir, [], whole=True)   # committed: none yet


def source_dataset(config: SegmentConfig, checked: CheckedRun, listing: Optional[pa.Table],
                   done: frozenset[int], cpus: float,
                   monitor: Optional[Any] = None) -> ray.data.Dataset:
    """Rows of ``sources.SOURCE_SCHEMA`` (or the listing) for the images still to segment;
    ``checked`` holds what the preflight checks listed (the shards or tables to read).

    Reading shards or tables runs in tasks of ``cpus`` CPUs each, the decode stage's share:
    Ray's default of one CPU may not be free while the predictors hold the rest. Tar shards
    are read by segpipe's own stages (``formats.INPUT_FORMATS``) so that a damaged shard
    costs only its own unreadable part; ``monitor`` counts the members it skips.
    """
    chosen = formats.input_format(checked.input_format)
    if chosen.read is None:
        return ray.data.from_arrow(sources.split_listing(listing))
    paths = ray.data.from_arrow([pa.table({"path": [path]}) for path in checked.tables])
    options = sources.ReadOptions(config.input_path, checked.root, config.image_column, config.name_column)
    return paths.map_batches(chosen.read, batch_size=1, batch_format="pyarrow", num_cpus=cpus,
                             fn_kwargs={"options": options, "done": done, "monitor": monitor})


def remaining(listing: pa.Table, done: set[int]) -> pa.Table:
    """The rows of ``listing`` whose images are not ``done`` (Arrow compute: no Python object
    per listed image)."""
    done_ids = pa.array(np.fromiter(done, np.int64, len(done)))   # not sorted: a hash set
    return listing.filter(pc.invert(pc.is_in(listing.column("image_id"), value_set=done_ids)))


def stage_before_first_image(started: int, actors: int) -> str:
    """What a run is doing before its first image is done, from the predictor actors that
    have started (each loads the model in its ``__init__``)."""
    if started < actors:
        return f"starting predictor actors and loading the model ({started} of {actors} ready)"
    return "predicting the first batch"


@contextlib.contextmanager
def watching(monitor: Optional[Any], progress: Progress, period_s: float = 1.0,
             actors: int = 1) -> Iterator[None]:
    """While the block runs, update ``progress`` from the ``RunMonitor`` actor ``monitor``;
    until the first image is done, say which stage the run is in (``actors``: how many
    predictor actors it starts with)."""
    if monitor is None:
        yield
        return
    stop = threading.Event()
    progress.set_stage(stage_before_first_image(0, actors))

    def poll() -> None:
        while not stop.wait(period_s):
            with contextlib.suppress(Exception):  # a slow answer only delays the next line
                done, failed = ray.get(monitor.totals.remote(), timeout=10)
                if not done + failed:
                    started = len(ray.get(monitor.starts.remote(), timeout=10))
                    progress.set_stage(stage_before_first_image(started, actors))
                progress.update(done, failed)

    thread = threading.Thread(target=poll, name="segpipe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            progress.update(*ray.get(monitor.totals.remote(), timeout=10))
        progress.close()


@dataclass
class PreparedRun:
    """A run whose weights are loaded and whose OUTPUT is ready: all that remains is the work."""

    config: SegmentConfig
    checked: CheckedRun
    weights: ResolvedWeights
    output: OutputPlan   # done by execute_run once Ray has joined and the stages fit
    timer: report.Timer
    lease: Lease
    interrupted: Optional[threading.Event] = None   # Ctrl-C seen since the command began

    @property
    def settings(self) -> RunSettings:
        return self.output.settings

    @property
    def predictions_dir(self) -> str:
        return self.output.predictions_dir

    @property
    def done(self) -> set[int]:
        return self.output.done


def prepare_run(config: SegmentConfig, checked: Optional[CheckedRun] = None) -> PreparedRun:
    """Load the weights and their classes, check them against the categories file and any
    earlier run to resume, then create OUTPUT. Raises ``ConfigError`` before anything is
    written. ``checked`` is ``preflight.check_segment(config)`` when the caller ran it."""
    checked = checked or check_segment(config)
    timer = report.Timer()
    timer.seconds["checks"] = checked.seconds
    with timer("weights"):
        weights = resolve_weights(checked.weights, ModelSpec.from_config(config), config.seed,
                                  checked.categories, show_progress=config.progress,
                                  tiled=bool(config.tile))
    settings = run_settings(config, weights)
    run_folder.create_folder(config.output_path, "OUTPUT")   # a no-op for the OUTPUT of a resume
    ownership.mark_folder(config.output_path, "segment")
    lease = acquire_lease(config.output_path)            # LeaseHeld: another run is writing it
    try:
        output = plan_output(config, settings)
        check_resumed_input(config, checked.listing, output.done)
    except BaseException:
        lease.release()
        raise
    return PreparedRun(config, checked, weights, output, timer, lease)


def run_segment(config: SegmentConfig, checked: Optional[CheckedRun] = None) -> report.RunReport:
    """Run the segment job described by ``config``; return its report (also in run.json)."""
    return execute_run(prepare_run(config, checked))


def execute_run(prepared: PreparedRun) -> report.RunReport:
    """Segment the images still to do on Ray, then write coco/ and run.json; OUTPUT's lease
    is renewed meanwhile and released at the end, whatever happens."""
    prepared.lease.start_renewing()
    try:
        return _segment_then_write(prepared)
    finally:
        prepared.lease.release()


def _stop_if_interrupted(prepared: PreparedRun, interrupted: threading.Event) -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C came (in this block, or since the command
    began) though no ``KeyboardInterrupt`` reached here: a library caught it."""
    if interrupted.is_set() or (prepared.interrupted is not None and prepared.interrupted.is_set()):
        raise KeyboardInterrupt


def _segment_then_write(prepared: PreparedRun) -> report.RunReport:
    config, weights, timer = prepared.config, prepared.weights, prepared.timer
    settings, predictions_dir, done = prepared.settings, prepared.predictions_dir, prepared.done
    for warning in weights.warnings:
        log.warning("%s", warning)
    input_format, listing = prepared.checked.input_format, prepared.checked.listing
    for reason, paths in prepared.checked.skipped.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        log.info("INPUT: left out %d %s: %s", len(paths), reason, shown)
    if done:
        log.info("resuming: %d images already in predictions/", len(done))
    todo = listing
    if listing is not None:
        with timer("todo"):
            todo = remaining(listing, done)
        log.info("%d images to segment under %s", todo.num_rows, config.input)
    else:
        log.info("segmenting the images in the %s input %s", input_format, config.input)

    cluster: dict = {"address": config.address or os.environ.get("RAY_ADDRESS") or "local"}
    reading: dict = {"skipped": {}, "cut_short": []}
    if todo is None or todo.num_rows:
        with ray_session(config.address), interrupt_flag() as interrupted, \
                ray_progress_bars(False):   # segpipe shows one line of its own (progress.py)
            _stop_if_interrupted(prepared, interrupted)   # a Ctrl-C swallowed while Ray started
            shape = read_cluster_shape()
            plan = plan_stages(config, shape)
            if todo is not None:   # no more actors than the work has batches for
                plan = fit_pool_to_work(plan, todo.num_rows, config)
            else:
                plan = fit_pool_to_unknown_work(plan)
            # the cluster is joined and the stages fit it: only now is anything removed
            clear_output(config, prepared.output)
            for note in plan.notes:
                log.info("%s", note)
            monitor = ray.remote(num_cpus=0)(RunMonitor).remote()
            try:
                progress = Progress("segment", todo.num_rows if todo is not None else None,
                                    enabled=config.progress)
                growth = ClusterWatch()
                with timer("pipeline"), watching(monitor if config.progress else None, progress,
                                                 actors=plan.min_actors), growth.running():
                    weights_ref = ray.put(weights.payload)
                    source = source_dataset(config, prepared.checked, todo, frozenset(done),
                                            plan.decode_cpus, monitor)
                    dataset = build_dataset(source, config, plan, weights.spec, weights_ref,
                                            weights.categories, monitor, settings.soft_mask_dtype)
                    dataset.write_datasink(sinks.PredictionSink(predictions_dir, config.rows_per_file,
                                                                settings, config.output,
                                                                prepared.lease.run_id),
                                           ray_remote_args={"num_cpus": plan.write_cpus})
                    operators = stage_figures(dataset)
                for reason, count in ray.get(monitor.skipped.remote(), timeout=30).items():
                    reading["skipped"][reason] = count
                    log.info("INPUT: left out %d %s", count, reason)
                cluster.update(resources={k: v for k, v in ray.cluster_resources().items()
                                          if k in ("CPU", "GPU", "memory")},
                               stages=plan.as_dict(), operators=operators,
                               predictors=ray.get(monitor.devices.remote(), timeout=30),
                               **growth.report(shape, ray.get(monitor.starts.remote(), timeout=30)))
                _stop_if_interrupted(prepared, interrupted)   # Ctrl-C a library caught and dropped
                # coco/ in Ray tasks, one per shard, while Ray is up
                counts, accounting, images = account_and_export(prepared, listing, timer,
                                                                parallel=True)
            finally:   # Ray Data keeps the handle past the run: the monitor would outlive it
                with contextlib.suppress(Exception):   # a cluster gone: nothing left to end
                    ray.kill(monitor)
    else:   # nothing left to segment: no Ray to start for the export
        clear_output(config, prepared.output)
        counts, accounting, images = account_and_export(prepared, listing, timer, parallel=False)
    reading["cut_short"] = report.cut_short(images)
    run_report = report.RunReport(config=config, weights=weights.identity(), cluster=cluster,
                                  counts=counts, accounting=accounting,
                                  errors=report.error_summary(images), timings=timer.seconds,
                                  processed=images.num_rows - len(done), resumed_from=len(done),
                                  categories=weights.categories.coco_json(),
                                  input_skipped=prepared.checked.skipped, reading=reading)
    report.write_manifest(run_report, config.output_path)
    return run_report


def account_and_export(prepared: PreparedRun, listing: Optional[pa.Table], timer: report.Timer,
                       parallel: bool) -> tuple[ExportCounts, report.Accounting, pa.Table]:
    """Record the prediction files the run committed, account for every input, and write
    coco/ (in Ray tasks with ``parallel``); return the export's counts, the accounting and the
    image table."""
    config, predictions_dir = prepared.config, prepared.predictions_dir
    with timer("image_table"):
        files = run_folder.prediction_files(predictions_dir)
        # the files the run committed, for every reader to check predictions/ against
        ownership.record_written(predictions_dir, [posixpath.basename(p) for p in files],
                                 whole=True)
        images = read_image_table(predictions_dir, files)
    with timer("accounting"):
        accounting = report.account_for_inputs(listing, images)
    with timer("export"):
        counts = export_coco(predictions_dir, run_folder.coco_dir(config.output_path),
                             ExportOptions(score_threshold=config.score_threshold),
                             prepared.settings, images, files, show_progress=config.progress,
                             parallel=parallel, shard_images=config.coco_shard_images)
    return counts, accounting, images

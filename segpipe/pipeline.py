"""The segment job: wire sources → decode → predictor pool → encode → Parquet on Ray Data.

``run_segment`` checks everything it can before any image is read (config, weights, input,
output), runs the Ray Data pipeline, then writes the COCO files and the run manifest from
what landed in ``predictions/`` and checks that every listed input came out exactly once.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import ray

from segpipe import report, sinks, sources, storage
from segpipe.config import ConfigError, ModelSpec, SegmentConfig, parse_actors, validate
from segpipe.decode import DecodeLimits, decode_batch
from segpipe.encode import encode_batch
from segpipe.export import ExportOptions, coco_info, export_coco, read_image_table
from segpipe.model import ResolvedWeights, resolve_weights
from segpipe.predictor import FaultInjection, MaskRCNNPredictor
from segpipe.schema import RunSettings

#: Images per decode or encode call; decoded pixels are large, so keep decode outputs small.
DECODE_BATCH = 4
#: CPUs per decode task. Reading from object stores is I/O-bound, so two tasks share a core;
#: the value also differs from the predictor's, which keeps Ray Data from fusing decode into
#: the predictor actors (decode must stay in CPU tasks, off the GPU actors' critical path).
DECODE_CPUS = 0.5


@dataclass(frozen=True)
class ActorPlan:
    """How the predictor pool is sized on the cluster it runs on."""

    min_actors: int
    max_actors: int
    num_gpus: float
    cpus_per_actor: float
    torch_threads: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_actors(config: SegmentConfig, resources: dict) -> ActorPlan:
    """Size the predictor pool for ``resources`` (``ray.cluster_resources()``)."""
    total_gpus = float(resources.get("GPU", 0))
    total_cpus = float(resources.get("CPU", 0))
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if total_gpus else 0.0)
    if num_gpus > 0 and total_gpus == 0:
        raise ConfigError(f"num_gpus={num_gpus} but the Ray cluster has no GPU; "
                          "set --num-gpus 0 to run the predictors on CPU")
    actors = parse_actors(config.actors)
    if actors is None:
        n = max(1, int(total_gpus // num_gpus)) if num_gpus > 0 else 1
        actors = (n, n)
    low, high = actors
    if num_gpus > 0 and high * num_gpus > total_gpus:
        raise ConfigError(f"{high} actors x {num_gpus} GPUs need {high * num_gpus:g} GPUs but the "
                          f"cluster has {total_gpus:g}; lower --actors or --num-gpus")
    if high * config.cpus_per_actor >= total_cpus:
        raise ConfigError(f"{high} actors x {config.cpus_per_actor:g} CPUs take all {total_cpus:g} "
                          "CPUs of the cluster and leave none for decode and encode tasks; "
                          "lower --actors or cpus_per_actor")
    threads = config.torch_threads
    if threads == 0 and num_gpus == 0:
        threads = max(1, int(total_cpus // high))
    return ActorPlan(low, high, num_gpus, config.cpus_per_actor, threads)


@contextlib.contextmanager
def ray_session(address: Optional[str]) -> Iterator[None]:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray; leave it as found."""
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def prepare_output(config: SegmentConfig, settings: RunSettings) -> tuple[str, set[int]]:
    """Return the predictions folder and the ids of the images already done in it.

    A fresh run refuses an OUTPUT that holds predictions, or clears it with ``overwrite``.
    With ``resume`` the complete files of an earlier run are kept (their images are skipped)
    after checking that they were made with the same settings; leftover temporary files of a
    killed run are removed.
    """
    predictions_dir = sinks.predictions_dir(config.output)
    fs, root = storage.resolve(predictions_dir)
    old = sinks.prediction_files(predictions_dir)
    if config.resume:
        if old:
            differences = settings.differences(sinks.read_run_settings(predictions_dir))
            if differences:
                raise ConfigError(f"cannot resume {config.output}: its predictions were made with "
                                  f"other settings ({', '.join(differences)}); resume with the "
                                  "same settings, or use --overwrite")
        for leftover in storage.list_files(fs, root, storage.TEMPORARY_SUFFIX):
            fs.delete_file(leftover.path)
        return predictions_dir, sinks.written_image_ids(predictions_dir)
    if old and not config.overwrite:
        raise ConfigError(f"{predictions_dir} already holds {len(old)} prediction file(s) from an "
                          "earlier run; pass --resume to finish it, --overwrite to replace it, "
                          "or choose another OUTPUT")
    for info in storage.list_files(fs, root):
        fs.delete_file(info.path)
    return predictions_dir, set()


def fault_injection(config: SegmentConfig) -> Optional[FaultInjection]:
    if not config.fault_kill_after_batches:
        return None
    return FaultInjection(config.fault_kill_after_batches,
                          storage.join(config.output.rstrip("/"), ".fault-injected"))


def source_dataset(config: SegmentConfig, input_format: str, listing: Optional[pa.Table],
                   done: frozenset[int]) -> ray.data.Dataset:
    """Rows of ``sources.SOURCE_SCHEMA`` (or the listing) for the images still to segment."""
    if input_format == "files":
        return ray.data.from_arrow(sources.split_listing(listing))
    fs, _ = storage.resolve(config.input)
    if input_format == "tar":
        root, shards = sources.list_tables(config.input, ".tar")
        ds = ray.data.read_webdataset(shards, filesystem=fs, decoder=None)
        return ds.map_batches(sources.tar_members, fn_kwargs={"root": root, "done": done},
                              batch_format="pyarrow")
    root, tables = sources.list_tables(config.input, ".parquet")
    columns = [config.image_column] + ([config.name_column] if config.name_column else [])
    ds = ray.data.read_parquet(tables, filesystem=fs, include_paths=True)
    ds = ds.select_columns([*columns, "path"])
    return ds.map_batches(sources.parquet_images,
                          fn_kwargs={"root": root, "image_column": config.image_column,
                                     "name_column": config.name_column, "done": done},
                          batch_format="pyarrow")


def build_dataset(source: ray.data.Dataset, config: SegmentConfig, plan: ActorPlan,
                  spec: ModelSpec, weights_ref) -> ray.data.Dataset:
    """The lazy Ray Dataset from source rows to ``schema.PREDICTION_SCHEMA`` rows."""
    limits = DecodeLimits(config.max_image_pixels, config.max_image_bytes)
    ds = source.map_batches(decode_batch, fn_kwargs={"input_uri": config.input, "limits": limits},
                        batch_size=DECODE_BATCH, batch_format="pyarrow", num_cpus=DECODE_CPUS)
    ds = ds.map_batches(
        MaskRCNNPredictor,
        fn_constructor_kwargs={"spec": spec, "weights": weights_ref, "use_gpu": plan.num_gpus > 0,
                               "precision": config.precision, "torch_threads": plan.torch_threads,
                               "fault": fault_injection(config)},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_gpus=plan.num_gpus,
        num_cpus=plan.cpus_per_actor,
    )
    return ds.map_batches(encode_batch, fn_kwargs={"mask_threshold": config.mask_threshold,
                                                   "keep_soft_masks": config.soft_masks},
                          batch_size=DECODE_BATCH, batch_format="pyarrow", num_cpus=1)


def run_settings(config: SegmentConfig, spec: ModelSpec, weights: ResolvedWeights) -> RunSettings:
    """What the predictions of this run depend on (recorded in every Parquet file)."""
    return RunSettings(model=spec, weights_sha256=weights.sha256,
                       mask_threshold=config.mask_threshold, soft_masks=config.soft_masks)


def list_inputs(config: SegmentConfig) -> tuple[str, Optional[pa.Table]]:
    """The input format and, for image files, the listing of every image (checked up front)."""
    input_format = config.input_format
    if input_format == "auto":
        input_format = sources.detect_input_format(config.input)
    if input_format == "files":
        return input_format, sources.list_images(config.input)
    suffix = ".tar" if input_format == "tar" else ".parquet"
    _, paths = sources.list_tables(config.input, suffix)
    if input_format == "parquet":
        sources.check_parquet_columns(paths, config.input, config.image_column, config.name_column)
    return input_format, None


def run_segment(config: SegmentConfig) -> report.RunReport:
    """Run the segment job described by ``config``; return its report (also in run.json)."""
    validate(config)
    timer = report.Timer()
    spec = ModelSpec.from_config(config)
    with timer("weights"):
        weights: ResolvedWeights = resolve_weights(config.weights, spec, config.seed)
    if weights.warning:
        print(f"segpipe: WARNING: {weights.warning}", flush=True)
    with timer("list"):
        input_format, listing = list_inputs(config)
    settings = run_settings(config, spec, weights)
    predictions_dir, done = prepare_output(config, settings)
    if done:
        print(f"segpipe: resuming: {len(done)} images already in predictions/", flush=True)
    todo = listing
    if listing is not None:
        todo = listing.filter(pa.array([i not in done for i in listing.column("image_id").to_pylist()]))
        print(f"segpipe: {todo.num_rows} images to segment under {config.input}", flush=True)
    else:
        print(f"segpipe: segmenting the images in the {input_format} input {config.input}", flush=True)

    cluster: dict = {"address": config.address or os.environ.get("RAY_ADDRESS") or "local"}
    if todo is None or todo.num_rows:
        with ray_session(config.address):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = config.progress
            plan = plan_actors(config, ray.cluster_resources())
            with timer("pipeline"):
                weights_ref = ray.put(weights.state_dict)
                source = source_dataset(config, input_format, todo, frozenset(done))
                dataset = build_dataset(source, config, plan, spec, weights_ref)
                dataset.write_datasink(sinks.PredictionSink(predictions_dir, config.rows_per_file,
                                                            settings))
            cluster.update(resources={k: v for k, v in ray.cluster_resources().items()
                                      if k in ("CPU", "GPU", "memory")},
                           predictor_pool=plan.as_dict())

    with timer("export"):
        images = read_image_table(predictions_dir)
        accounting = report.account_for_inputs(listing, images)
        info = coco_info("segpipe predictions", {"arch": config.arch,
                                                 "weights": weights.identity()})
        counts = export_coco(predictions_dir, storage.join(config.output.rstrip("/"), "coco"),
                             ExportOptions(score_threshold=config.score_threshold),
                             config.mask_threshold, info, images)
    run_report = report.RunReport(config=config, weights=weights.identity(), cluster=cluster,
                                  counts=counts, accounting=accounting,
                                  errors=report.error_summary(images), timings=timer.seconds,
                                  processed=images.num_rows - len(done), resumed_from=len(done))
    report.write_manifest(run_report, config.output)
    return run_report

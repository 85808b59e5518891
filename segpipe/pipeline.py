"""The segment job: wire sources → decode → predictor pool → encode → Parquet on Ray Data.

``run_segment`` takes what ``preflight.check_segment`` found (config, input, output, weights
and categories files, checked before torch or Ray), resolves the weights and their classes,
runs the Ray Data pipeline, then writes the COCO files and the run manifest from what landed
in ``predictions/`` and checks that every listed input came out exactly once.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import pyarrow as pa
import ray

from segpipe import layout, ownership, report, schema, sinks, sources, storage
from segpipe.cluster import ClusterShape, ClusterWatch, ray_session, read_cluster_shape
from segpipe.categories import COCO_TABLE, CategoryTable
from segpipe.config import ConfigError, ModelSpec, SegmentConfig, check_precision_device, \
    parse_actors
from segpipe.decode import DecodeLimits, decode_batch
from segpipe.encode import MaskEncoder
from segpipe.export import ExportOptions, coco_info, export_coco, read_image_table
from segpipe.model import ResolvedWeights, resolve_weights
from segpipe.predictor import FaultInjection, MaskRCNNPredictor
from segpipe.preflight import CheckedRun, check_segment
from segpipe.lease import Lease, acquire as acquire_lease
from segpipe.progress import Progress, RunMonitor
from segpipe.schema import RunSettings
from segpipe.tiles import TileSettings

#: Images per decode or encode call; decoded pixels are large, so keep decode outputs small.
DECODE_BATCH = 4
#: Host memory allowed for each CPU predictor actor when sizing the pool (measured: 1.1-1.7 GB
#: RSS for Mask R-CNN R50-FPN at min_size 800, docs/benchmarks.md).
CPU_ACTOR_MEMORY = 2 << 30
#: CPUs Ray reserves for a decode task, an encode actor and a write task: (decode, encode, write).
#: With GPUs, decode and encode are real CPU work beside the GPU (decode is partly I/O).
#: On CPU-only clusters the forward pass is the work (seconds per image against milliseconds
#: for decode and encode), so those stages get small shares and the predictors the rest.
GPU_STAGE_CPUS = (0.5, 1.0, 0.25)
CPU_STAGE_CPUS = (0.25, 0.2, 0.05)
#: On CPU-only clusters, one encode actor per this many CPUs (one encoder keeps up with
#: hundreds of CPU predictors: ~4 ms of encoding against ~3-6 s of forward per image).
CPU_PREDICTORS_PER_ENCODER = 16
#: What sizes the encoders on GPU clusters (docs/benchmarks.md): one GPU's predictor runs up to
#: ~160 images/s (H100, fp16, 1333×800, 2026-11-27), and encoding one image costs ~4 ms of a
#: CPU (median 3.4 ms for 100 detections of 16-500 px on 1200×800, this project's 2-core
#: Xeon; ``bench/encode_speed.py``). ENCODE_HEADROOM covers slower CPUs and busier images.
GPU_IMAGES_PER_S = 160
ENCODE_CPU_S_PER_IMAGE = 0.004
ENCODE_HEADROOM = 2.0


@dataclass(frozen=True)
class StagePlan:
    """How the stages share the cluster: the predictor pool and the CPU stages around it.

    On a CPU-only cluster the default is one single-threaded predictor actor per CPU, which
    turns the cores into independent workers: measured on 2 cores, two 1-thread model
    instances ran 0.338 images/s together where one 2-thread instance ran 0.29, and the
    2-thread one lost a further ~10% to light background load, since each parallel region
    waits for its slowest thread (docs/benchmarks.md).

    ``decode_cpus`` always differs from ``cpus_per_actor``: Ray Data fuses a task stage into
    the actor stage after it when their remote arguments are equal, and decoding would then
    run inside the predictor actors.

    ``notes`` are what the run prints about the plan (a pool that waits for nodes to join, a
    cluster whose largest size segpipe cannot see).
    """

    min_actors: int
    max_actors: int
    num_gpus: float
    cpus_per_actor: float
    torch_threads: int
    decode_cpus: float
    encode_cpus: float
    write_cpus: float
    max_encoders: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


def plan_stages(config: SegmentConfig, cluster: ClusterShape) -> StagePlan:
    """Size the predictor pool and the CPU stages for ``cluster``, now and as it can grow.

    The pool is ``ActorPoolStrategy(min_actors, max_actors)``: Ray Data starts the minimum
    (waiting for the autoscaler where even that needs nodes that are not there yet) and adds
    actors as nodes join, asking Ray's autoscaler for them itself. ``auto`` makes the minimum
    what fits now (at least one) and the maximum what fits the cluster at its largest
    (``ClusterShape.largest``: one actor per GPU, or on CPU-only clusters one per CPU and
    2 GiB of memory). A plan is refused only when it can never run: more GPUs or CPUs per
    actor than any node or node type has, or a maximum the largest cluster cannot hold.
    When the node types are not visible, a minimum that fits now is accepted with any
    maximum, and the run says so.

    CPU shares on CPU-only clusters: every actor reserves ``(c - s) / c`` CPUs, ``c`` the
    CPUs of the smallest node that is or can be in the cluster (present nodes and node types
    alike; nodes with no more than ``s`` CPUs are left out, they can only hold predictors)
    and ``s`` the stages' share. Whatever nodes have joined, however Ray places the
    default pool's ``sum(floor(c_i))`` actors (over the cluster at its largest), some node
    keeps ``s`` free once the nodes the actors wait for have joined: a node holding at most
    ``c_i`` actors keeps ``c_i - c_i (c - s) / c >= s`` since ``c_i >= c``, and not every
    node can hold more than its ``c_i``. Decode, encode and write can always start, so the
    pipeline cannot stall.
    """
    notes: list[str] = []
    gpus_now, gpus_max = cluster.now("GPU"), cluster.largest("GPU")
    cpus_now, cpus_max = cluster.now("CPU"), cluster.largest("CPU")
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus_max else 0.0)
    on_gpu = num_gpus > 0
    if on_gpu and gpus_max == 0:
        raise ConfigError(
            f"num_gpus={num_gpus:g} but the Ray cluster has no GPU"
            + (" and none of its autoscaler's node types has one" if cluster.known else
               " (and segpipe cannot see its autoscaler's node types: if GPU nodes start on "
               "demand, start one first or run the job on the head node)")
            + "; set --num-gpus 0 to run the predictors on CPU")
    if on_gpu and num_gpus > max(cluster.node_kinds("GPU")):
        raise ConfigError(f"num_gpus={num_gpus:g}: no node of the cluster"
                          + (" or of its node types" if cluster.node_types else "")
                          + f" has that many GPUs (at most {max(cluster.node_kinds('GPU')):g}"
                            "); lower --num-gpus")
    check_precision_device(config.precision, on_gpu)
    decode_cpus, encode_cpus, write_cpus = GPU_STAGE_CPUS if on_gpu else CPU_STAGE_CPUS
    # Set aside room for one decode task, one write task and the encoders that always run:
    # one with GPUs (more start on the CPUs the predictors leave), all of them on CPU.
    cpu_encoders = 1 + int(cpus_max) // CPU_PREDICTORS_PER_ENCODER
    set_aside = decode_cpus + write_cpus + encode_cpus * (1 if on_gpu else cpu_encoders)
    # the node sizes the CPU shares are made for: leave out nodes too small for the stages'
    # share (a 1-CPU head beside big workers), which could only ever hold predictors
    sizes = [c for c in cluster.node_kinds("CPU") if c >= 1] or [max(cpus_now, 1.0)]
    kinds = [c for c in sizes if c > set_aside] or sizes
    nodes_now = [c for c in (node.get("CPU", 0) for node in cluster.nodes) if c >= 1]
    nodes_max = [c for c in cluster.largest_node_cpus() if c >= 1] or kinds

    def cpu_pool(node_cpus: list[float], memory: float) -> int:
        return max(1, min(sum(int(c) for c in node_cpus), int(memory // CPU_ACTOR_MEMORY)))

    actors = parse_actors(config.actors)
    if actors is None:
        if on_gpu:
            low = max(1, int(gpus_now // num_gpus))
            actors = (low, max(low, int(gpus_max // num_gpus)))
        else:
            low = cpu_pool(nodes_now, cluster.now("memory"))
            actors = (low, max(low, cpu_pool(nodes_max, cluster.largest("memory"))))
    low, high = actors
    cpus_per_actor = config.cpus_per_actor
    if cpus_per_actor is None:
        share = (min(kinds) - set_aside) / min(kinds)
        cpus_per_actor = 1.0 if on_gpu else math.floor(share * 1000) / 1000
    if cpus_per_actor > max(kinds):
        raise ConfigError(f"cpus_per_actor={cpus_per_actor:g}: no node of the cluster"
                          + (" or of its node types" if cluster.node_types else "")
                          + f" has that many CPUs (at most {max(kinds):g})")
    if cpus_per_actor == decode_cpus:
        raise ConfigError(f"cpus_per_actor may not be {cpus_per_actor:g}, the CPUs of a decode "
                          "task: Ray Data would then fuse decoding into the predictor actors")

    def gpus_fit(count: int, gpus: float) -> bool:
        return not on_gpu or count * num_gpus <= gpus + 1e-9

    def cpus_fit(count: int, cpus: float) -> bool:
        return cpus_per_actor > 0 and count * cpus_per_actor + set_aside <= cpus + 1e-9

    unseen = []  # what the pool's maximum needs beyond what the cluster has, size unknown
    for fits, what, now, largest in ((gpus_fit, "GPUs", gpus_now, gpus_max),
                                     (cpus_fit, "CPUs", cpus_now, cpus_max)):
        if fits(high, largest):
            continue
        if cluster.known or not fits(low, now):
            raise ConfigError(_too_few(what, low if not fits(low, largest) else high, num_gpus,
                                       set_aside, largest, cluster.known))
        unseen.append(f"{now:g} {what}")
    if unseen:
        notes.append(f"the cluster has {' and '.join(unseen)} now, and segpipe cannot see how "
                     f"far its autoscaler can grow it: the pool starts with {low} predictor "
                     f"actors and grows towards {high} only if nodes join")
    if cluster.known and (gpus_max > gpus_now or cpus_max > cpus_now):
        notes.append(f"the cluster can grow from {cpus_now:g} CPUs and {gpus_now:g} GPUs to "
                     f"{cpus_max:g} CPUs and {gpus_max:g} GPUs (node types from "
                     f"{cluster.source}): the pool starts with {low} predictor actors and "
                     f"grows to {high} as Ray's autoscaler adds nodes")
        if not (gpus_fit(low, gpus_now) and cpus_fit(low, cpus_now)):
            notes.append(f"{low} predictor actors do not fit the nodes there now: the run "
                         "starts when the autoscaler has added the nodes they need")
    threads = config.torch_threads
    if threads == 0 and not on_gpu:
        threads = max(1, min(int(max(kinds)), int(cpus_max // high)))
    max_encoders = cpu_encoders
    if on_gpu:
        max_encoders = gpu_encoders(high * num_gpus, encode_cpus,
                                    cpus_max - high * cpus_per_actor - decode_cpus - write_cpus)
    return StagePlan(low, high, num_gpus, cpus_per_actor, threads, decode_cpus, encode_cpus,
                     write_cpus, max_encoders, tuple(notes))


def fit_pool_to_work(plan: StagePlan, images: int, config: SegmentConfig) -> StagePlan:
    """``plan`` with no more predictor actors than ``images`` make batches for: Ray Data
    starts the pool's minimum whatever the work, and actors beyond the batches there are
    would load the model and never predict (Ray warns so)."""
    tiling = TileSettings.from_config(config)
    per_batch = 1 if tiling else max(config.batch_size, DECODE_BATCH)
    batches = max(1, math.ceil(images / per_batch))
    return replace(plan, min_actors=min(plan.min_actors, batches),
                   max_actors=min(plan.max_actors, batches))


def gpu_encoders(gpus: float, encode_cpus: float, spare_cpus: float) -> int:
    """The most encode actors beside predictors on ``gpus`` GPUs: enough that encoding never
    caps a node below its GPUs' rate, and no more (the CPUs left are decode's).

    Each GPU's predictor can deliver ``GPU_IMAGES_PER_S`` images/s; encoding them takes
    ``GPU_IMAGES_PER_S * ENCODE_CPU_S_PER_IMAGE`` CPUs (0.64 for the figures measured),
    times ``ENCODE_HEADROOM``, in actors of ``encode_cpus`` CPUs each; at least one, and no
    more than the ``spare_cpus`` the predictors and a decode and a write task leave. Ray
    Data's autoscaling pool (1 to this many) starts fewer while fewer keep up.
    """
    needed = math.ceil(gpus * GPU_IMAGES_PER_S * ENCODE_CPU_S_PER_IMAGE * ENCODE_HEADROOM
                       / encode_cpus)
    return max(1, min(needed, int(spare_cpus // encode_cpus)))


def _too_few(what: str, actors: int, num_gpus: float, set_aside: float, largest: float,
             known: bool) -> str:
    """The refusal of a pool that can never run: ``actors`` need more ``what`` than the
    cluster has (``known``: at its largest)."""
    has = "can grow to" if known else "has"
    if what == "GPUs":
        return (f"{actors} actors x {num_gpus:g} GPUs need {actors * num_gpus:g} GPUs but the "
                f"cluster {has} {largest:g}; lower --actors or --num-gpus")
    return (f"{actors} predictor actors leave too few of the {largest:g} CPUs the cluster "
            f"{has} for decode, encode and write tasks ({set_aside:g} needed); lower --actors "
            "or --cpus-per-actor")


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """Record Ctrl-C (SIGINT) while the block runs, besides raising ``KeyboardInterrupt`` as
    usual: a KeyboardInterrupt raised inside Ray's code can be caught there, and the run must
    still stop before it writes coco/ and run.json as if nothing happened."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        flag.set()
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_output(config: SegmentConfig,
                   settings: RunSettings) -> tuple[str, set[int], RunSettings]:
    """Return the predictions folder, the ids of the images already done in it, and the
    settings this run writes with.

    A fresh run refuses an OUTPUT that holds predictions, or clears it with ``overwrite``
    (segpipe's own files only: ``layout.check_output`` refuses anything else).
    With ``resume`` the complete files of an earlier run are kept (their images are skipped)
    after checking that they were made with the same settings; a run made before soft masks
    were stored as uint16 goes on storing them as uint8, so one run's files agree. Leftover
    temporary files of a killed run are removed.
    """
    predictions_dir = layout.predictions_dir(config.output)
    # segpipe's own files only (ownership): anything else there is refused, not removed
    complete, temporary = layout.check_output(config.output, config.resume, config.overwrite)
    ownership.remove(predictions_dir, temporary)
    if config.resume:
        earlier, done = layout.read_written(predictions_dir)
        if earlier is not None and earlier.soft_mask_dtype == schema.SOFT_MASK_DTYPE_BEFORE:
            settings = replace(settings, soft_mask_dtype=earlier.soft_mask_dtype)
        differences = settings.differences(earlier) if earlier is not None else []
        if differences:
            raise ConfigError(f"cannot resume {config.output}: its predictions were made with "
                              f"other settings ({', '.join(differences)}); resume with the "
                              "same settings, or use --overwrite")
        return predictions_dir, done, settings
    ownership.remove(predictions_dir, complete)
    ownership.record_written(predictions_dir, [], whole=True)   # what this run commits: none yet
    return predictions_dir, set(), settings


def fault_injection(config: SegmentConfig) -> Optional[FaultInjection]:
    if not config.fault_kill_after_batches:
        return None
    return FaultInjection(config.fault_kill_after_batches,
                          storage.join(config.output.rstrip("/"), ".fault-injected"))


def source_dataset(config: SegmentConfig, checked: CheckedRun, listing: Optional[pa.Table],
                   done: frozenset[int], cpus: float,
                   monitor: Optional[Any] = None) -> ray.data.Dataset:
    """Rows of ``sources.SOURCE_SCHEMA`` (or the listing) for the images still to segment;
    ``checked`` holds what the preflight checks listed (the shards or tables to read).

    Reading shards or tables runs in tasks of ``cpus`` CPUs each, the decode stage's share:
    Ray's default of one CPU may not be free while the predictors hold the rest. Tar shards
    are read by segpipe's own stage (``sources.read_tar_shards``) so that a damaged shard
    costs only its own unreadable part; ``monitor`` counts the members it skips.
    """
    if checked.input_format == "files":
        return ray.data.from_arrow(sources.split_listing(listing))
    paths = ray.data.from_arrow([pa.table({"path": [path]}) for path in checked.tables])
    if checked.input_format == "tar":
        return paths.map_batches(sources.read_tar_shards, batch_size=1,
                                 fn_kwargs={"input_uri": config.input, "root": checked.root,
                                            "done": done, "monitor": monitor},
                                 batch_format="pyarrow", num_cpus=cpus)
    return paths.map_batches(sources.read_image_tables, batch_size=1,
                             fn_kwargs={"input_uri": config.input, "root": checked.root,
                                        "image_column": config.image_column,
                                        "name_column": config.name_column, "done": done},
                             batch_format="pyarrow", num_cpus=cpus)


def build_dataset(source: ray.data.Dataset, config: SegmentConfig, plan: StagePlan,
                  spec: ModelSpec, weights_ref, categories: CategoryTable = COCO_TABLE,
                  monitor: Optional[Any] = None,
                  soft_mask_dtype: str = schema.SOFT_MASK_DTYPE) -> ray.data.Dataset:
    """The lazy Ray Dataset from source rows to ``schema.PREDICTION_SCHEMA`` rows.

    ``categories`` maps the model's labels to the run's categories (default: COCO's);
    ``monitor`` is a ``RunMonitor`` actor: encoders report finished images to it, predictors
    the device they run on; soft masks are stored as ``soft_mask_dtype``.
    """
    limits = DecodeLimits(config.max_image_pixels, config.max_image_bytes)
    tiling = TileSettings.from_config(config)
    # with tiles, one image per call: huge images never share a block or a predictor call
    # (its tiles make full forward passes on their own); without, batch_size images per
    # predictor call and DECODE_BATCH per decode or encode call
    images_per_call = 1 if tiling else config.batch_size
    images_per_block = 1 if tiling else DECODE_BATCH
    ds = source.map_batches(decode_batch, fn_kwargs={"input_uri": config.input, "limits": limits},
                            batch_size=images_per_block, batch_format="pyarrow",
                            num_cpus=plan.decode_cpus)
    ds = ds.map_batches(
        MaskRCNNPredictor,
        fn_constructor_kwargs={"spec": spec, "weights": weights_ref, "use_gpu": plan.num_gpus > 0,
                               "precision": config.precision, "torch_threads": plan.torch_threads,
                               "fault": fault_injection(config), "canvas": config.batch_canvas,
                               "monitor": monitor, "tiling": tiling,
                               "chunk": config.batch_size},
        batch_size=images_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=plan.min_actors, max_size=plan.max_actors,
            **({"max_concurrent_calls_per_actor": config.predictor_threads,
                "enable_true_multi_threading": True} if config.predictor_threads > 1 else {})),
        num_gpus=plan.num_gpus,
        num_cpus=plan.cpus_per_actor,
    )
    return ds.map_batches(
        MaskEncoder,
        fn_constructor_kwargs={"mask_threshold": config.mask_threshold,
                               "keep_soft_masks": config.soft_masks,
                               "categories": categories, "monitor": monitor,
                               "soft_mask_dtype": soft_mask_dtype},
        batch_size=images_per_block, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_encoders),
        num_cpus=plan.encode_cpus)


def run_settings(config: SegmentConfig, weights: ResolvedWeights) -> RunSettings:
    """What the predictions of this run depend on (recorded in every Parquet file)."""
    return RunSettings(model=weights.spec, weights_sha256=weights.sha256,
                       mask_threshold=config.mask_threshold, soft_masks=config.soft_masks,
                       categories=weights.categories, soft_mask_dtype=config.soft_mask_dtype,
                       tiles=TileSettings.from_config(config))


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
    settings: RunSettings
    predictions_dir: str
    done: set[int]
    timer: report.Timer
    lease: Lease


def prepare_segment(config: SegmentConfig, checked: Optional[CheckedRun] = None) -> PreparedRun:
    """Load the weights and their classes, check them against the categories file and any
    earlier run to resume, then create OUTPUT. Raises ``ConfigError`` before anything is
    written. ``checked`` is ``preflight.check_segment(config)`` when the caller ran it."""
    checked = checked or check_segment(config)
    timer = report.Timer()
    timer.seconds["checks"] = checked.seconds
    with timer("weights"):
        weights = resolve_weights(checked.weights, ModelSpec.from_config(config), config.seed,
                                  checked.categories, show_progress=config.progress)
    settings = run_settings(config, weights)
    layout.create_folder(config.output, "OUTPUT")   # a no-op for the OUTPUT of a resume
    ownership.mark_folder(config.output, "segment")
    lease = acquire_lease(config.output)            # LeaseHeld: another run is writing it
    try:
        predictions_dir, done, settings = prepare_output(config, settings)
    except BaseException:
        lease.release()
        raise
    return PreparedRun(config, checked, weights, settings, predictions_dir, done, timer, lease)


def run_segment(config: SegmentConfig, checked: Optional[CheckedRun] = None) -> report.RunReport:
    """Run the segment job described by ``config``; return its report (also in run.json)."""
    return execute_segment(prepare_segment(config, checked))


def execute_segment(prepared: PreparedRun) -> report.RunReport:
    """Segment the images still to do on Ray, then write coco/ and run.json; OUTPUT's lease
    is renewed meanwhile and released at the end, whatever happens."""
    prepared.lease.start_renewing()
    try:
        return _execute_segment(prepared)
    finally:
        prepared.lease.release()


def _execute_segment(prepared: PreparedRun) -> report.RunReport:
    config, weights, timer = prepared.config, prepared.weights, prepared.timer
    settings, predictions_dir, done = prepared.settings, prepared.predictions_dir, prepared.done
    for warning in weights.warnings:
        print(f"segpipe: WARNING: {warning}", flush=True)
    input_format, listing = prepared.checked.input_format, prepared.checked.listing
    for reason, paths in prepared.checked.skipped.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        print(f"segpipe: INPUT: left out {len(paths)} {reason}: {shown}", flush=True)
    if done:
        print(f"segpipe: resuming: {len(done)} images already in predictions/", flush=True)
    todo = listing
    if listing is not None:
        todo = listing.filter(pa.array([i not in done for i in listing.column("image_id").to_pylist()]))
        print(f"segpipe: {todo.num_rows} images to segment under {config.input}", flush=True)
    else:
        print(f"segpipe: segmenting the images in the {input_format} input {config.input}", flush=True)

    cluster: dict = {"address": config.address or os.environ.get("RAY_ADDRESS") or "local"}
    reading: dict = {"skipped": {}, "cut_short": []}
    if todo is None or todo.num_rows:
        with ray_session(config.address), interrupt_flag() as interrupted:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # segpipe shows one line of its own (progress.py)
            shape = read_cluster_shape()
            plan = plan_stages(config, shape)
            if todo is not None:   # no more actors than the work has batches for
                plan = fit_pool_to_work(plan, todo.num_rows, config)
            for note in plan.notes:
                print(f"segpipe: {note}", flush=True)
            monitor = ray.remote(num_cpus=0)(RunMonitor).remote()
            progress = Progress("segment", todo.num_rows if todo is not None else None,
                                enabled=config.progress)
            growth = ClusterWatch()
            with timer("pipeline"), watching(monitor if config.progress else None, progress,
                                             actors=plan.min_actors), growth.running():
                weights_ref = ray.put(weights.state_dict)
                source = source_dataset(config, prepared.checked, todo, frozenset(done),
                                        plan.decode_cpus, monitor)
                dataset = build_dataset(source, config, plan, weights.spec, weights_ref,
                                        weights.categories, monitor, settings.soft_mask_dtype)
                dataset.write_datasink(sinks.PredictionSink(predictions_dir, config.rows_per_file,
                                                            settings, config.output,
                                                            prepared.lease.run_id),
                                       ray_remote_args={"num_cpus": plan.write_cpus})
            for reason, count in ray.get(monitor.skipped.remote(), timeout=30).items():
                reading["skipped"][reason] = count
                print(f"segpipe: INPUT: left out {count} {reason}", flush=True)
            cluster.update(resources={k: v for k, v in ray.cluster_resources().items()
                                      if k in ("CPU", "GPU", "memory")},
                           stages=plan.as_dict(),
                           predictors=ray.get(monitor.devices.remote(), timeout=30),
                           **growth.report(shape, ray.get(monitor.starts.remote(), timeout=30)))

        if interrupted.is_set():   # Ctrl-C that a library caught and did not re-raise
            raise KeyboardInterrupt
    with timer("export"):
        # the files the run committed, for every reader to check predictions/ against
        ownership.record_written(predictions_dir, [posixpath.basename(p) for p in
                                                   layout.prediction_files(predictions_dir)],
                                 whole=True)
        images = read_image_table(predictions_dir)
        accounting = report.account_for_inputs(listing, images)
        reading["cut_short"] = report.cut_short(images)
        info = coco_info("segpipe predictions", {"arch": config.arch,
                                                 "weights": weights.identity()})
        counts = export_coco(predictions_dir, layout.coco_dir(config.output),
                             ExportOptions(score_threshold=config.score_threshold),
                             settings, info, images, show_progress=config.progress)
    run_report = report.RunReport(config=config, weights=weights.identity(), cluster=cluster,
                                  counts=counts, accounting=accounting,
                                  errors=report.error_summary(images), timings=timer.seconds,
                                  processed=images.num_rows - len(done), resumed_from=len(done),
                                  categories=weights.categories.coco_json(),
                                  input_skipped=prepared.checked.skipped, reading=reading)
    report.write_manifest(run_report, config.output)
    return run_report

"""Size the stages for a cluster: the predictor actor pool and the CPU shares of decode, encode
and write, for the cluster now and as its autoscaler can grow it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from segpipe.cluster.shape import ClusterShape
from segpipe.config import ConfigError, SegmentConfig, check_precision_device, parse_actors
from segpipe.model.spec import TileSettings

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


#: What sizes the encoders on GPU clusters: the most images/s one GPU's predictor delivers, and
#: the CPU-seconds encoding one image costs (both measured, with their machines and commands,
#: in docs/benchmarks.md: ``bench/gpu_smoke.py``, ``bench/encode_speed.py``).
#: ENCODE_HEADROOM covers slower CPUs and busier images.
GPU_IMAGES_PER_S = 160
ENCODE_CPU_S_PER_IMAGE = 0.004
ENCODE_HEADROOM = 2.0


@dataclass(frozen=True)
class StagePlan:
    """How the stages share the cluster: the predictor pool and the CPU stages around it.

    On a CPU-only cluster the default is one single-threaded predictor actor per CPU, which
    turns the cores into independent workers: two 1-thread model instances outran one
    2-thread instance on 2 cores, which also lost more to background load, since each
    parallel region waits for its slowest thread (the figures: docs/benchmarks.md).

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


def plan_stages(config: SegmentConfig, cluster: ClusterShape,
                read_cpus: float = 0.0) -> StagePlan:
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
    # a Dataset from Ray's own readers (the Python API) decodes in its read tasks, which ask
    # for ``read_cpus`` each (Ray's default: 1): the stage must be given that much room
    decode_cpus = max(decode_cpus, read_cpus)
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
    if config.torch_threads > max(nodes_max):   # 100,000 threads starved the machine of pids
        raise ConfigError(f"torch_threads={config.torch_threads}: no node of the cluster has "
                          f"that many CPUs (at most {max(nodes_max):g}); lower --torch-threads, "
                          "or 0 to share each node's CPUs among its predictor actors")

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


def fit_pool_to_unknown_work(plan: StagePlan) -> StagePlan:
    """``plan`` for work whose images are known only as they are read (tar shards, Parquet
    tables, a Ray Dataset handed to the API): the pool starts at one actor, which Ray Data
    grows to the maximum as blocks queue, so that none loads the model for no batch (Ray
    warns of a minimum it cannot fill: small blocks are bundled, so even the shard count is
    no floor)."""
    return replace(plan, min_actors=1)


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

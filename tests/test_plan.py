"""How the stages share a cluster: pool sizes, CPU shares, and Ray Data's operator layout."""

from __future__ import annotations

import pytest

from conftest import small_config, small_spec
from segpipe.io import sources
from segpipe.cluster.shape import ClusterShape
from segpipe.config import ConfigError
from segpipe.cluster.plan import CPU_ACTOR_MEMORY, plan_stages
from segpipe.pipeline import build_dataset

GIB = 1 << 30
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def plan_config(**changes):
    """A small config with the product's pool sizing (the tests' own pins one actor)."""
    return small_config("in", "out", "random", **{"actors": "auto", "torch_threads": 0, **changes})


def cpu_plan(cpus: float, memory: float = 1024 * GIB, **changes):
    return plan_stages(plan_config(**changes),
                       ClusterShape.of({"CPU": cpus, "memory": memory}))


def stage_cpus(plan) -> float:
    """CPUs reserved when every predictor, every CPU-only encoder, one decode and one write run."""
    encoders = 1 if plan.num_gpus else plan.max_encoders
    return (plan.max_actors * plan.cpus_per_actor + encoders * plan.encode_cpus
            + plan.decode_cpus + plan.write_cpus)


def test_cpu_cluster_gets_one_single_threaded_predictor_per_cpu():
    plan = cpu_plan(2)
    assert (plan.min_actors, plan.max_actors, plan.torch_threads, plan.num_gpus) == (2, 2, 1, 0)
    assert stage_cpus(plan) <= 2


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 7, 8, 16, 33, 64, 96])
def test_default_cpu_plans_fit_and_keep_decode_out_of_the_predictors(cpus):
    plan = cpu_plan(cpus)
    assert plan.max_actors == cpus
    assert stage_cpus(plan) <= cpus + 1e-9
    assert plan.cpus_per_actor != plan.decode_cpus  # equal remote args would fuse decode in
    assert plan.torch_threads == 1


def test_cpu_predictors_are_capped_by_memory():
    plan = cpu_plan(16, memory=5 * CPU_ACTOR_MEMORY + 1)
    assert plan.max_actors == 5
    assert plan.torch_threads == 3  # the 16 CPUs shared by 5 actors
    assert stage_cpus(plan) <= 16


def test_explicit_cpu_pool_keeps_its_threads():
    plan = cpu_plan(8, actors="1", torch_threads=0)
    assert (plan.max_actors, plan.torch_threads) == (1, 8)
    assert cpu_plan(8, actors="2", torch_threads=3).torch_threads == 3
    assert cpu_plan(8, actors="1", torch_threads=8).torch_threads == 8
    with pytest.raises(ConfigError, match=r"torch_threads=9: no node .*\(at most 8\)"):
        cpu_plan(8, actors="1", torch_threads=9)   # 100,000 starved the machine of threads


def test_gpu_cluster_gets_one_predictor_per_gpu_and_encoders_on_spare_cpus():
    plan = plan_stages(plan_config(),
                       ClusterShape.of({"CPU": 32, "GPU": 4, "memory": 256 * GIB}))
    assert (plan.max_actors, plan.num_gpus, plan.cpus_per_actor, plan.torch_threads) == (4, 1, 1, 0)
    # 4 GPUs x 160 images/s x 4 ms = 2.6 CPUs of encoding, doubled: 6 one-CPU encoders
    assert plan.max_encoders == 6
    assert plan.max_encoders * plan.encode_cpus >= 2 * 4 * 160 * 0.004
    half = plan_stages(plan_config(num_gpus=0.5),
                       ClusterShape.of({"CPU": 32, "GPU": 4}))
    assert half.max_actors == 8


@pytest.mark.parametrize("resources,changes,message", [
    ({"CPU": 8}, {"num_gpus": 1.0}, "has no GPU"),
    ({"CPU": 8, "GPU": 1}, {"actors": "2"}, "need 2 GPUs"),
    ({"CPU": 2, "memory": 64 * GIB}, {"actors": "2", "cpus_per_actor": 1.0}, "too few"),
    ({"CPU": 2, "memory": 64 * GIB}, {"actors": "1", "cpus_per_actor": 0.25}, "fuse decoding"),
])
def test_plans_that_cannot_run_are_refused_before_work(resources, changes, message):
    with pytest.raises(ConfigError) as info:
        plan_stages(plan_config(**changes), ClusterShape.of(resources))
    assert message in str(info.value)


def test_decode_predict_and_encode_stay_separate_operators(local_ray, capsys):
    """Ray Data would fuse neighbouring stages with equal remote args; the plan must prevent it."""
    import ray

    config = plan_config()
    plan = plan_stages(config, ClusterShape.of(ray.cluster_resources()))
    source = ray.data.from_arrow(sources.SOURCE_SCHEMA.empty_table())
    dataset = build_dataset(source, config, plan, small_spec(), ray.put({}))
    dataset.explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    for operator in ("TaskPoolMapOperator[MapBatches(decode_batch)]",
                     "ActorPoolMapOperator[MapBatches(PredictStage)]",
                     "ActorPoolMapOperator[MapBatches(MaskEncoder)]"):
        assert operator in physical


@pytest.mark.parametrize("nodes", [[1, 2], [2, 2, 2], [1, 8], [4, 16, 3], [2.5, 1]])
def test_stages_fit_on_some_node_wherever_ray_places_the_predictors(nodes):
    """Every placement of the default CPU pool leaves room for decode, encode and write."""
    import itertools

    plan = plan_stages(plan_config(),
                       ClusterShape.of({"CPU": sum(nodes), "memory": 64 * GIB}, nodes))
    assert plan.max_actors == sum(int(c) for c in nodes)
    room = plan.decode_cpus + plan.encode_cpus + plan.write_cpus
    for counts in itertools.product(*(range(plan.max_actors + 1) for _ in nodes)):
        placed = [k * plan.cpus_per_actor for k in counts]
        if sum(counts) != plan.max_actors or any(p > c + 1e-9 for p, c in zip(placed, nodes)):
            continue  # not a placement Ray could make
        assert max(c - p for c, p in zip(nodes, placed)) >= room - 1e-9


# Autoscaling clusters: the pool and the CPU shares are sized for what the cluster can become.

HEAD = "node:__internal_head__"


def grows(head: dict, *types: tuple[str, dict, int], max_workers=None, workers=()) -> ClusterShape:
    from segpipe.cluster.shape import NodeType

    return ClusterShape(({**head, HEAD: 1.0}, *workers),
                        tuple(NodeType(name, res, count) for name, res, count in types),
                        max_workers, "a test")


def test_the_launcher_recipe_shape_plans_a_pool_that_waits_for_gpu_nodes():
    """conf/cluster-launcher-gpu.yaml: a head with no CPU or GPU for work, GPU workers 0-8."""
    shape = grows({"CPU": 0, "memory": 30 * GIB},
                  ("gpu_worker", {"CPU": 8, "GPU": 1, "memory": 30 * GIB}, 8), max_workers=8)
    plan = plan_stages(plan_config(num_gpus=1.0, actors="1-8"), shape)
    assert (plan.min_actors, plan.max_actors, plan.num_gpus) == (1, 8, 1.0)
    assert any("starts when the autoscaler has added" in note for note in plan.notes)
    auto = plan_stages(plan_config(), shape)
    assert (auto.min_actors, auto.max_actors, auto.num_gpus) == (1, 8, 1.0)
    # encoders for 8 GPUs' images (8 x 160 images/s x 4 ms, doubled: 11 CPUs)
    assert auto.max_encoders == 11


def test_the_rayjob_recipe_shape_starts_with_its_one_gpu_worker():
    """conf/kuberay-rayjob.yaml: head with num-cpus 0, one GPU worker replica of at most 8."""
    worker = {"CPU": 8, "GPU": 1, "memory": 48 * GIB}
    known = grows({"CPU": 0}, ("gpu", worker, 8), workers=(worker,))
    plan = plan_stages(plan_config(num_gpus=1.0, actors="1-8"), known)
    assert (plan.min_actors, plan.max_actors) == (1, 8)
    # KubeRay's autoscaler runs in its own container: node types unknown, proceed and say so
    unknown = ClusterShape(({"CPU": 0, HEAD: 1.0}, worker))
    plan = plan_stages(plan_config(num_gpus=1.0, actors="1-8"), unknown)
    assert (plan.min_actors, plan.max_actors) == (1, 8)
    assert any("cannot see how far" in note for note in plan.notes)


@pytest.mark.parametrize("shape,changes,message", [
    (grows({"CPU": 1}, ("w", {"CPU": 2}, 2)), {"num_gpus": 1.0}, "none of its autoscaler's"),
    (grows({"CPU": 4}, ("w", {"CPU": 8, "GPU": 1}, 2)), {"num_gpus": 2.0}, "no node of the"),
    (grows({"CPU": 4}, ("w", {"CPU": 8, "GPU": 1}, 2)), {"actors": "1-3"}, "can grow to 2"),
    (grows({"CPU": 1}, ("w", {"CPU": 2}, 2)), {"actors": "1-12"}, "can grow to"),
    (grows({"CPU": 1}, ("w", {"CPU": 2}, 2)), {"cpus_per_actor": 3.0}, "no node of the"),
    (ClusterShape(({"CPU": 8, "GPU": 1},)), {"actors": "2-4"}, "need 2 GPUs"),
])
def test_pools_that_can_never_run_are_refused_on_growing_clusters(shape, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(plan_config(**changes), shape)


def test_cpu_pool_grows_to_the_largest_cluster_with_shares_for_the_smallest_node():
    """The issue's test cluster: a 1-CPU head and up to two 2-CPU workers."""
    shape = grows({"CPU": 1, "memory": 64 * GIB}, ("cpu2", {"CPU": 2}, 2))
    assert (shape.now("CPU"), shape.largest("CPU")) == (1, 5)
    plan = plan_stages(plan_config(actors="1-3"), shape)
    assert (plan.min_actors, plan.max_actors, plan.torch_threads) == (1, 3, 1)
    auto = plan_stages(plan_config(), shape)
    assert (auto.min_actors, auto.max_actors) == (1, 5)
    # shares from the smallest node (the 1-CPU head): the stages fit beside one actor there
    assert auto.cpus_per_actor + stage_cpus(auto) - auto.max_actors * auto.cpus_per_actor <= 1


@pytest.mark.parametrize("joined", [[1], [1, 2], [1, 2, 2], [1, 2, 4]])
def test_stages_fit_on_some_node_of_a_grown_cluster_wherever_the_predictors_land(joined):
    """The every-placement proof over node types: once the nodes joined, any placement of
    the default pool that Ray could make leaves some node room for decode, encode, write."""
    import itertools

    shape = grows({"CPU": 1, "memory": 64 * GIB}, ("cpu2", {"CPU": 2}, 1),
                  ("cpu4", {"CPU": 4}, 1))
    plan = plan_stages(plan_config(), shape)
    assert plan.max_actors == 7
    actors = sum(int(c) for c in joined)  # what Ray Data runs once these nodes are there
    room = plan.decode_cpus + plan.encode_cpus + plan.write_cpus
    for counts in itertools.product(*(range(actors + 1) for _ in joined)):
        placed = [k * plan.cpus_per_actor for k in counts]
        if sum(counts) != actors or any(p > c + 1e-9 for p, c in zip(placed, joined)):
            continue
        assert max(c - p for c, p in zip(joined, placed)) >= room - 1e-9


def test_launcher_configs_give_node_types_and_unfilled_instance_types_give_none():
    import yaml

    from segpipe.cluster.shape import node_types_of_launcher_config

    config = yaml.safe_load((ROOT / "conf" / "cluster-launcher-gpu.yaml").read_text())
    assert node_types_of_launcher_config(config) == (None, None)  # resources: {} (AWS fills)
    config["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 8, "GPU": 1}
    types, cap = node_types_of_launcher_config(config)
    assert cap == 8 and [(t.name, t.resources["GPU"], t.max_count) for t in types] == \
        [("gpu_worker", 1.0, 8)]


def test_gpu_encoders_keep_up_with_the_gpus_and_leave_the_rest_to_decode():
    from segpipe.cluster.plan import ENCODE_CPU_S_PER_IMAGE, GPU_IMAGES_PER_S, gpu_encoders

    for gpus in (1, 2, 8):
        encoders = gpu_encoders(gpus, 1.0, spare_cpus=100)
        assert encoders / ENCODE_CPU_S_PER_IMAGE >= 1.5 * gpus * GPU_IMAGES_PER_S
        assert encoders <= 2 * gpus   # not every spare CPU: decode needs them
    assert gpu_encoders(8, 1.0, spare_cpus=3.5) == 3    # never more than the CPUs left
    assert gpu_encoders(1, 1.0, spare_cpus=0) == 1      # and always one


def test_a_small_head_beside_big_workers_does_not_starve_the_cpu_shares():
    """A 1-CPU head and 64-CPU workers: the stages' share (with 5 encoders) is more than the
    head has, so the shares are made for the workers and the plan still fits."""
    shape = grows({"CPU": 1, "memory": 512 * GIB}, ("cpu64", {"CPU": 64}, 1),
                  workers=({"CPU": 64},))
    plan = plan_stages(plan_config(), shape)
    assert plan.cpus_per_actor > 0.9 and plan.max_actors == 65
    assert stage_cpus(plan) <= 65 + 1e-9


def test_an_address_nobody_answers_at_is_said_at_once_without_its_secret():
    import socket
    import time

    from segpipe.cluster.session import unreachable

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    said = unreachable(f"ray://user:s3cret@127.0.0.1:{port}")
    assert said is not None and said.startswith(f"no Ray cluster answers at ray://***@127.0.0.1:{port}")
    assert "s3cret" not in said and "refused" in said and time.perf_counter() - start < 5
    assert unreachable(f"127.0.0.1:{port}") is not None
    assert [unreachable(a) for a in ("auto", "local", "anyscale://x", "http://h:8265")] == [None] * 4
    with socket.socket() as server:   # one that listens
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"127.0.0.1:{server.getsockname()[1]}") is None

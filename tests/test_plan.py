"""How the stages share a cluster: pool sizes, CPU shares, and Ray Data's operator layout."""

from __future__ import annotations

import pytest

from conftest import small_config, small_spec
from segpipe import sources
from segpipe.config import ConfigError
from segpipe.pipeline import CPU_ACTOR_MEMORY, build_dataset, plan_stages

GIB = 1 << 30


def cpu_plan(cpus: float, memory: float = 1024 * GIB, **changes):
    return plan_stages(small_config("in", "out", "random", **changes),
                       {"CPU": cpus, "memory": memory})


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


def test_gpu_cluster_gets_one_predictor_per_gpu_and_encoders_on_spare_cpus():
    plan = plan_stages(small_config("in", "out", "random"),
                       {"CPU": 32, "GPU": 4, "memory": 256 * GIB})
    assert (plan.max_actors, plan.num_gpus, plan.cpus_per_actor, plan.torch_threads) == (4, 1, 1, 0)
    spare = 32 - 4 * 1 - plan.decode_cpus - plan.write_cpus
    assert plan.max_encoders == int(spare / 2 // plan.encode_cpus) >= 1
    half = plan_stages(small_config("in", "out", "random", num_gpus=0.5), {"CPU": 32, "GPU": 4})
    assert half.max_actors == 8


@pytest.mark.parametrize("resources,changes,message", [
    ({"CPU": 8}, {"num_gpus": 1.0}, "has no GPU"),
    ({"CPU": 8, "GPU": 1}, {"actors": "2"}, "need 2 GPUs"),
    ({"CPU": 2, "memory": 64 * GIB}, {"actors": "2", "cpus_per_actor": 1.0}, "too few"),
    ({"CPU": 2, "memory": 64 * GIB}, {"actors": "1", "cpus_per_actor": 0.25}, "fuse decoding"),
])
def test_plans_that_cannot_run_are_refused_before_work(resources, changes, message):
    with pytest.raises(ConfigError) as info:
        plan_stages(small_config("in", "out", "random", **changes), resources)
    assert message in str(info.value)


def test_decode_predict_and_encode_stay_separate_operators(local_ray, capsys):
    """Ray Data would fuse neighbouring stages with equal remote args; the plan must prevent it."""
    import ray

    config = small_config("in", "out", "random")
    plan = plan_stages(config, ray.cluster_resources())
    source = ray.data.from_arrow(sources.SOURCE_SCHEMA.empty_table())
    dataset = build_dataset(source, config, plan, small_spec(), ray.put({}))
    dataset.explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    for operator in ("TaskPoolMapOperator[MapBatches(decode_batch)]",
                     "ActorPoolMapOperator[MapBatches(MaskRCNNPredictor)]",
                     "ActorPoolMapOperator[MapBatches(MaskEncoder)]"):
        assert operator in physical


@pytest.mark.parametrize("nodes", [[1, 2], [2, 2, 2], [1, 8], [4, 16, 3], [2.5, 1]])
def test_stages_fit_on_some_node_wherever_ray_places_the_predictors(nodes):
    """Every placement of the default CPU pool leaves room for decode, encode and write."""
    import itertools

    plan = plan_stages(small_config("in", "out", "random"),
                       {"CPU": sum(nodes), "memory": 64 * GIB}, nodes)
    assert plan.max_actors == sum(int(c) for c in nodes)
    room = plan.decode_cpus + plan.encode_cpus + plan.write_cpus
    for counts in itertools.product(*(range(plan.max_actors + 1) for _ in nodes)):
        placed = [k * plan.cpus_per_actor for k in counts]
        if sum(counts) != plan.max_actors or any(p > c + 1e-9 for p, c in zip(placed, nodes)):
            continue  # not a placement Ray could make
        assert max(c - p for c, p in zip(nodes, placed)) >= room - 1e-9

"""The cluster recipes in conf/ are valid for the tools that read them, and their segpipe
command lines pass segpipe's checks and plan a pool on clusters shaped like theirs."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from segpipe.cli import build_parser, segment_config
from segpipe.cluster.shape import (
    HEAD_MARKER,
    ClusterShape,
    NodeType,
    node_types_of_launcher_config,
)
from segpipe.config import ConfigError
from segpipe.cluster.plan import plan_stages

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "conf" / "cluster-launcher-gpu.yaml"
RAYJOB = ROOT / "conf" / "kuberay-rayjob.yaml"
#: KubeRay v1.7.0's RayJob schema (tests/data/README.md says where it comes from).
RAYJOB_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.7.0-rayjob-v1-schema.json.gz"
#: What Ray's AWS provider fills in for the launcher's g5.2xlarge workers (EC2's figures:
#: 8 vCPUs, one A10G, 32 GiB; Ray gives 70% of memory to tasks): it asks EC2 for them when
#: `ray up` runs, which a test cannot.
G5_2XLARGE = {"CPU": 8, "GPU": 1, "memory": 0.7 * 32 * 2**30}
GIB = 2**30


def rayjob_schema() -> dict:
    return json.loads(gzip.decompress(RAYJOB_SCHEMA.read_bytes()))


def pruned_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields Kubernetes would silently drop (prune) from a custom resource: keys that the
    structural schema does not declare. A misspelled key passes JSON-schema validation, since
    CRD schemas allow unknown keys; the API server then removes it without a word."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties = schema.get("properties")
        if properties is None:
            extra = schema.get("additionalProperties")
            return [f for k, v in value.items() for f in
                    (pruned_fields(v, extra, f"{path}.{k}") if isinstance(extra, dict) else [])]
        found = [f"{path}.{k}" for k in value if k not in properties]
        return found + [f for k, v in value.items() if k in properties
                        for f in pruned_fields(v, properties[k], f"{path}.{k}")]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, v in enumerate(value)
                for f in pruned_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def check_rayjob(manifest: dict) -> None:
    jsonschema.validate(manifest, rayjob_schema())
    pruned = pruned_fields(manifest, rayjob_schema())
    assert not pruned, f"Kubernetes would drop {pruned}"


def test_rayjob_recipe_is_a_valid_kuberay_rayjob():
    manifest = yaml.safe_load(RAYJOB.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    check_rayjob(manifest)
    misspelled = copy.deepcopy(manifest)
    misspelled["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    with pytest.raises(AssertionError, match="maxReplica"):
        check_rayjob(misspelled)
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        check_rayjob(wrong_type)


def test_launcher_recipe_passes_rays_own_config_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    misspelled = copy.deepcopy(config)
    misspelled["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(misspelled))


def segpipe_args(text: str) -> list[str]:
    """The arguments after ``jobs/segment.py`` in a recipe's command, with the image's /app
    paths made this repository's."""
    words = shlex.split(text.replace("\\\n", " "))
    args = words[[i for i, w in enumerate(words) if w.endswith("jobs/segment.py")][0] + 1:]
    return [str(ROOT / a[len("/app/"):]) if a.startswith("/app/") else a for a in args]


def launcher_command() -> list[str]:
    """The `ray job submit` command that the launcher recipe's header comment gives."""
    comment = "\n".join(line[1:].strip() for line in LAUNCHER.read_text().splitlines()
                        if line.startswith("#"))
    command = comment[comment.index("ray job submit"):]
    return segpipe_args(command[:command.index("\n", command.index("--resume"))])


def launcher_shape() -> ClusterShape:
    """The launcher recipe's cluster at the start: its head only (min_workers 0), with the
    worker type's resources as Ray's AWS provider fills them in."""
    config = yaml.safe_load(LAUNCHER.read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = G5_2XLARGE
    types, cap = node_types_of_launcher_config(config)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    return ClusterShape(({**head, "memory": 22 * GIB, HEAD_MARKER: 1.0},), types, cap, "recipe")


def quantity(text) -> float:
    """A Kubernetes quantity ("8", "48Gi", "500m") as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    return float(match.group(1)) * units.get(match.group(2), 1)


def rayjob_shapes() -> list[ClusterShape]:
    """The RayJob recipe's cluster at the start (its head and `replicas` GPU workers), once
    with its node types as KubeRay's autoscaler knows them and once as segpipe sees them from
    the head pod (not at all: KubeRay's autoscaler reads the RayCluster resource)."""
    spec = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]
    head = {"CPU": quantity(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]),
            HEAD_MARKER: 1.0}
    nodes, types = [head], []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": quantity(limits["cpu"]), "GPU": quantity(limits["nvidia.com/gpu"]),
                     "memory": quantity(limits["memory"])}
        nodes += [resources] * group["replicas"]
        types.append(NodeType(group["groupName"], resources, group["maxReplicas"]))
    return [ClusterShape(tuple(nodes), tuple(types), None, "recipe"), ClusterShape(tuple(nodes))]


@pytest.mark.parametrize("recipe", ["launcher", "rayjob"])
def test_recipe_command_lines_pass_segpipes_checks_and_plan_their_pools(recipe):
    if recipe == "launcher":
        args, shapes = launcher_command(), [launcher_shape()]
    else:
        args, shapes = segpipe_args(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"]), \
            rayjob_shapes()
    parsed = build_parser().parse_args(["segment", *args])
    config = segment_config(parsed)   # raises ConfigError on any mistake
    assert (config.num_gpus, config.actors, config.resume) == (1.0, "1-8", True)
    for shape in shapes:
        plan = plan_stages(config, shape)
        assert (plan.min_actors, plan.max_actors, plan.num_gpus) == (1, 8, 1.0)
    # the same command on a fixed cluster with fewer GPUs than its minimum is refused
    with pytest.raises(ConfigError, match="no GPU"):
        plan_stages(config, ClusterShape(({"CPU": 8, HEAD_MARKER: 1.0},)))

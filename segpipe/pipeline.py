"""The stages of a segment run as Ray Data operators: decode tasks, the predictor actor pool and
the encoder actors, from decoded (or source) rows to ``schema.PREDICTION_SCHEMA`` rows; the
settings its predictions record; and what Ray Data measured of each stage. The ``segpipe
segment`` job (``commands.segment``) and the Python API (``api``) wire their datasets through
here."""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import ray

from segpipe import schema
from segpipe.cluster.plan import DECODE_BATCH, StagePlan
from segpipe.config import SegmentConfig
from segpipe.encode.encoder import MaskEncoder
from segpipe.io import storage
from segpipe.io.decode import DecodeLimits, decode_batch
from segpipe.model.categories import COCO_TABLE, CategoryTable
from segpipe.model.faults import FaultInjection
from segpipe.model.resolved import ResolvedWeights
from segpipe.model.settings import RunSettings
from segpipe.model.spec import ModelSpec, TileSettings
from segpipe.model.stage import PredictStage

log = logging.getLogger(__name__)

#: The lines of ``Dataset.stats()`` that ``stage_figures`` reads: an operator's heading, and
#: its tasks' wall and CPU time in all (Ray writes seconds as us, ms or s).
_OPERATOR = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, \d+ blocks "
                       r"produced in (?P<seconds>[\d.]+)s$", re.M)
_REMOTE = re.compile(r"^\* Remote (?P<kind>wall|cpu) time: .*?(?P<total>[\d.]+)(?P<unit>us|ms|s) "
                     r"total$", re.M)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def fault_injection(config: SegmentConfig) -> Optional[FaultInjection]:
    if not config.fault_kill_after_batches:
        return None
    return FaultInjection(config.fault_kill_after_batches,
                          storage.join(config.output_path.rstrip("/"), ".fault-injected"))


def build_dataset(source: ray.data.Dataset, config: SegmentConfig, plan: StagePlan,
                  spec: ModelSpec, weights_ref, categories: CategoryTable = COCO_TABLE,
                  monitor: Optional[Any] = None,
                  soft_mask_dtype: str = schema.SOFT_MASK_DTYPE) -> ray.data.Dataset:
    """The lazy Ray Dataset from source rows to ``schema.PREDICTION_SCHEMA`` rows.

    ``categories`` maps the model's labels to the run's categories (default: COCO's);
    ``monitor`` is a ``RunMonitor`` actor: encoders report finished images to it, predictors
    the device they run on; soft masks are stored as ``soft_mask_dtype``.
    """
    ds = source.map_batches(decode_batch, fn_kwargs={"input_uri": config.input,
                                                     "limits": decode_limits(config),
                                                     "jpeg_to_predictor":
                                                         config.decode == "predictor"},
                            batch_size=images_per_block(config), batch_format="pyarrow",
                            num_cpus=plan.decode_cpus)
    return predict_and_encode(ds, config, plan, spec, weights_ref, categories, monitor,
                              soft_mask_dtype)


def decode_limits(config: SegmentConfig) -> DecodeLimits:
    return DecodeLimits(config.max_image_pixels, config.max_image_bytes)


def images_per_block(config: SegmentConfig) -> int:
    """Images per decode or encode call: one with tiles (a huge image never shares a block),
    else ``DECODE_BATCH``."""
    return 1 if TileSettings.from_config(config) else DECODE_BATCH


def predict_and_encode(decoded: ray.data.Dataset, config: SegmentConfig, plan: StagePlan,
                       spec: ModelSpec, weights_ref, categories: CategoryTable = COCO_TABLE,
                       monitor: Optional[Any] = None,
                       soft_mask_dtype: str = schema.SOFT_MASK_DTYPE) -> ray.data.Dataset:
    """Decoded rows (``io.decode``'s) to ``schema.PREDICTION_SCHEMA`` rows: the predictor
    actor pool, then the encoders (see ``build_dataset``)."""
    tiling = TileSettings.from_config(config)
    # with tiles, one image per call (its tiles make full forward passes on their own)
    images_per_call = 1 if tiling else config.batch_size
    ds = decoded.map_batches(
        PredictStage,
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
                               "soft_mask_dtype": soft_mask_dtype,
                               "mask_frame": spec.mask_frame},
        batch_size=images_per_block(config), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_encoders),
        num_cpus=plan.encode_cpus)


def run_settings(config: SegmentConfig, weights: ResolvedWeights) -> RunSettings:
    """What the predictions of this run depend on (recorded in every Parquet file)."""
    return RunSettings(model=weights.spec, weights_sha256=weights.sha256,
                       mask_threshold=config.mask_threshold, soft_masks=config.soft_masks,
                       categories=weights.categories, soft_mask_dtype=config.soft_mask_dtype,
                       tiles=TileSettings.from_config(config),
                       random_weights=weights.kind == "random")


def stage_figures(dataset: ray.data.Dataset) -> dict[str, dict[str, float]]:
    """What Ray Data measured of each stage of an executed ``dataset``, by operator name:
    ``active_s`` (from its first task to its last: the stage active longest limits the
    run), ``tasks``, and its tasks' ``wall_s`` and ``cpu_s`` in all. Read from the text of
    ``Dataset.stats()`` (Ray keeps no public structure of it); empty when that cannot be had."""
    try:
        text = dataset.stats()
    except Exception as exc:  # noqa: BLE001 - figures for run.json: never fail a finished run
        log.debug("Ray Data's stage statistics are not available: %s", exc)
        return {}
    figures: dict[str, dict[str, float]] = {}
    heads = list(_OPERATOR.finditer(text))
    for head, after in zip(heads, heads[1:] + [None]):
        block = text[head.end():after.start() if after else len(text)]
        found = {"active_s": float(head["seconds"]), "tasks": int(head["tasks"])}
        for remote in _REMOTE.finditer(block):
            found[f"{remote['kind']}_s"] = round(float(remote["total"]) * _UNIT[remote["unit"]], 3)
        figures[head["name"]] = found
    return figures

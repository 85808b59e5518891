"""segpipe from Python: a small typed facade over the commands, in the shape Ray Data teaches.

* ``segment(ds, config)``: a lazy Ray Dataset of prediction rows (``schema.PREDICTION_SCHEMA``)
  from the datasets Ray's readers make: ``read_images(include_paths=True)`` (decoded pixels),
  ``read_binary_files(include_paths=True)`` (file bytes), ``read_webdataset`` (a ``jpg``,
  ``png``... column and ``__key__``) or ``read_parquet`` of a table with an image-bytes column.
  The same decode, predictor pool and encoders as ``segpipe segment``, the same error rows.
* ``Predictor``: a callable class for a user's own ``map_batches`` on those columns (loads
  in ``__init__``, predicts in ``__call__``), rows with readable ``detections``.
* ``write_predictions(ds, output, config)`` and ``export(output, to, ...)``: a Dataset of
  predictions into a run folder, and COCO files from it, without the model; results as
  dataclasses.

``config`` is a ``SegmentConfig`` or a dict of the YAML keys of ``conf/default.yaml``
(``input`` and ``output`` are not needed). Ray must be initialised, or is, as Ray Data does.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import inspect
import logging
import numbers
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union, cast

import numpy as np
import pyarrow as pa

from segpipe import schema
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.config import DEFAULT_COCO_SHARD_IMAGES, ConfigError, SegmentConfig, check_keys, validate
from segpipe.io.decode import decode_batch, pixel_column
from segpipe.model.families import check_decode, check_installed
from segpipe.model.spec import ModelSpec, TileSettings

ConfigLike = Union[SegmentConfig, Mapping[str, Any], None]

log = logging.getLogger(__name__)

#: Columns Ray's readers give image bytes in (``read_binary_files``; ``read_webdataset``'s
#: suffixes), tried in this order when ``image_column`` is not one of the batch's columns.
BYTES_COLUMNS = ("bytes", "jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
#: Columns that name a row: ``include_paths=True``'s ``path``, webdataset's ``__key__``.
NAME_COLUMNS = ("path", "__key__")


def python_terms(message: str) -> str:
    """A message of the command line's checks in the words of the Python API: flags become
    the parameters and config keys of the same name (``--overwrite`` → ``overwrite=True``,
    ``--no-soft-masks`` → ``soft_masks=False``, ``--score-floor`` → ``score_floor``)."""
    def word(match: re.Match) -> str:
        name = match.group(2).replace("-", "_")
        if match.group(1):
            return f"{name}=False"
        return f"{name}=True" if name in _SWITCHES else name

    return re.sub(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)", word, message).replace(
        "OUTPUT", "output")


#: The command line's switches, which are ``True`` keys or parameters in Python.
_SWITCHES = ("overwrite", "resume", "polygons", "soft_masks", "progress", "tile_full_pass",
             "tile_join_seams", "crowd_as_objects")


_Function = TypeVar("_Function", bound=Callable[..., Any])


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (numbers as ``numbers`` counts
    them, so numpy's too; a ``bool`` is no number; a list's items are checked, one level)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_accepts(value, argument) for argument in arguments)
    if hint is type(None):
        return value is None
    if hint in (float, int):
        return isinstance(value, numbers.Real if hint is float else numbers.Integral) and \
            not isinstance(value, bool)
    if origin in (list, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and \
            (not arguments or all(_accepts(item, arguments[0]) for item in value))
    kind = origin or hint
    return isinstance(value, kind) if isinstance(kind, type) else True


def _described(hint: Any) -> str:
    """``hint`` in words: ``a number or None``."""
    if typing.get_origin(hint) is Union:
        return " or ".join(dict.fromkeys(_described(a) for a in typing.get_args(hint)))
    words = {type(None): "None", float: "a number", int: "an integer", str: "a string",
             bool: "True or False"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint) or hint
    if origin in (list, collections.abc.Sequence):
        return "a list"
    return "a dict" if origin is collections.abc.Mapping else f"a {getattr(origin, '__name__', hint)}"


def _plain(value: Any, hint: Any) -> Any:
    """``value`` as the plain Python the code and its JSON files expect: a path object as
    its string where a string is asked, a numpy number as a Python one."""
    if isinstance(value, os.PathLike) and _accepts("", hint):
        return os.fspath(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _checked_arguments(function: Callable[..., Any], args: tuple,
                       kwargs: dict) -> inspect.BoundArguments:
    """The arguments of a call of ``function``, made plain (``_plain``) and checked against its
    annotations: ``ConfigError`` naming the first of another type, as the command line's
    flags are checked, not deep inside."""
    hints = typing.get_type_hints(function)
    bound = inspect.signature(function).bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        if name not in hints or name == "return":
            continue
        bound.arguments[name] = value = _plain(value, hints[name])
        if not _accepts(value, hints[name]):
            raise ConfigError(f"{function.__name__}(): {name} must be {_described(hints[name])}, "
                              f"got {value!r}"[:300])
    return bound


def _in_python_terms(function: _Function) -> _Function:
    """``function`` with its arguments checked against its annotations, raising its
    ``ConfigError`` in ``python_terms``."""
    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                bound = _checked_arguments(function, args, kwargs)
            except TypeError as exc:   # a missing or unknown argument: Python's own words
                raise TypeError(f"{function.__name__}(): {exc}") from None
            return function(*bound.args, **bound.kwargs)
        except ConfigError as exc:
            raise type(exc)(python_terms(str(exc))) from None

    return cast(_Function, wrapped)


#: Classes to export: comma-separated names or ids (as ``--classes``), or a list of them.
Classes = Union[str, Sequence[Union[str, int]], None]


def _classes_text(classes: Classes) -> Optional[str]:
    """``classes`` as ``--classes`` takes them."""
    if classes is None or isinstance(classes, str):
        return classes
    return ",".join(str(item) for item in classes)


@_in_python_terms
def as_config(config: ConfigLike = None, **overrides: Any) -> SegmentConfig:
    """``config`` (a ``SegmentConfig``, a dict of YAML keys, or None for the defaults) with
    ``overrides``, validated; ``ConfigError`` says what to fix."""
    overrides = {key: _plain(value, Any) for key, value in overrides.items()}
    if isinstance(config, SegmentConfig):
        result = dataclasses.replace(config, **overrides)
    else:
        values = {**{key: _plain(value, Any) for key, value in dict(config or {}).items()},
                  **overrides}
        check_keys(values, "config")
        result = SegmentConfig(**values)
    validate(result, needs_paths=False)
    check_installed(result.arch)   # ConfigError naming the architectures there are, or the extra
    check_decode(result.arch, result.decode)
    return result


def _resolve(config: SegmentConfig):
    from segpipe.model.categories import load_categories
    from segpipe.model.resolved import resolve_weights

    categories = load_categories(config.categories) if config.categories else None
    weights = resolve_weights(config.weights, ModelSpec.from_config(config), config.seed,
                              categories, tiled=bool(config.tile))
    for warning in weights.warnings:   # random weights, a half-precision checkpoint...
        log.warning("%s", warning)
    return weights


def file_names(paths: list[str], root: Optional[str] = None) -> list[str]:
    """The ``file_name`` of each of Ray's ``path`` values: relative to ``root`` (the folder
    or URI that was read, as ``segpipe segment``'s INPUT: the same names and image ids as
    the command line gives), else the path without its leading ``/``; made safe as every
    name of a folder entry (``sources.folder_file_name``)."""
    from segpipe.io.sources import folder_file_name

    prefix = None
    if root is not None:   # Ray's readers name s3://bucket/key as bucket/key
        prefix = root.split("://", 1)[1] if "://" in root else os.path.abspath(root)
        prefix = prefix.split("?", 1)[0].rstrip("/") + "/"
    return [folder_file_name(path[len(prefix):] if prefix and path.startswith(prefix)
                             else path.lstrip("/")) for path in paths]


def _names(batch: Mapping[str, np.ndarray], data: Callable[[], list[bytes]],
           root: Optional[str] = None) -> list[str]:
    for column in NAME_COLUMNS:
        if column in batch:
            return file_names([str(v) for v in batch[column]], root)
    # no name: the hash of the bytes (of the pixels, with their shape, for decoded rows), as
    # for Parquet rows without one: a row's position in its batch would name rows of other
    # batches alike
    return [f"#{hashlib.blake2b(bytes(d), digest_size=8).hexdigest()}" for d in data()]


def _pixel_bytes(value: Any) -> bytes:
    """What names a decoded image without a name: its shape, type and pixels."""
    if not isinstance(value, np.ndarray):
        return repr(value).encode()
    return f"{value.shape}{value.dtype}".encode() + np.ascontiguousarray(value).tobytes()


def _rgb(array: np.ndarray) -> np.ndarray:
    """A decoded image from Ray's ``read_images`` as ``H×W×3`` uint8 (gray repeated, alpha
    dropped, as Pillow's conversion to RGB does)."""
    if array.dtype != np.uint8:
        raise ValueError(f"pixels of type {array.dtype}, not uint8")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"pixels of shape {array.shape}, not H×W×channels")
    if array.shape[2] in (1, 2):
        array = np.repeat(array[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def source_rows(batch: Mapping[str, np.ndarray], image_column: str = "image",
                root: Optional[str] = None) -> pa.Table:
    """One batch of a Ray reader's rows (numpy batch format) as segpipe's rows: decoded rows
    (``io.decode``'s) for ``read_images``' pixels, source rows with ``data`` for bytes; a row
    whose image cannot be used becomes an error row, never a failed batch."""
    from segpipe.io.sources import SOURCE_SCHEMA, image_id_for

    column = image_column if image_column in batch else next(
        (c for c in ("image", *BYTES_COLUMNS) if c in batch), None)
    if column is None:
        raise ValueError(f"no image column among {sorted(batch)}: name it with image_column")
    values = list(batch[column])
    if values and isinstance(values[0], np.ndarray) and values[0].dtype != object:
        names = _names(batch, lambda: [_pixel_bytes(v) for v in values], root)
        pixels: list[Optional[np.ndarray]] = []
        statuses: list[str] = []
        errors: list[Optional[str]] = []
        widths: list[Optional[int]] = []
        heights: list[Optional[int]] = []
        for value in values:
            try:
                rgb = _rgb(value)
                pixels.append(rgb)
                statuses.append(schema.STATUS_OK)
                errors.append(None)
                heights.append(rgb.shape[0])
                widths.append(rgb.shape[1])
            except ValueError as exc:
                pixels.append(None)
                statuses.append(schema.STATUS_ERROR)
                errors.append(f"decode: {exc}")
                heights.append(None)
                widths.append(None)
        ids = pa.array([image_id_for(n) for n in names], pa.int64())
        return pa.table({"image_id": ids, "file_name": pa.array(names, pa.string()),
                         "width": pa.array(widths, pa.int32()),
                         "height": pa.array(heights, pa.int32()),
                         "status": pa.array(statuses, pa.string()),
                         "error": pa.array(errors, pa.string()),
                         schema.PIXELS: pixel_column(pixels)})
    data = [_image_bytes(v) for v in values]
    names = _names(batch, lambda: [d or b"" for d in data], root)
    return pa.table({
        "image_id": pa.array([image_id_for(n) for n in names], pa.int64()),
        "file_name": pa.array(names, pa.string()),
        "path": pa.array([None] * len(names), pa.string()),
        "size": pa.array([len(d) if d is not None else 0 for d in data], pa.int64()),
        "data": pa.array(data, pa.large_binary()),
        "source_error": pa.array([None if d is not None else
                                  f"the {column} column holds no image bytes" for d in data],
                                 pa.string()),
    }, schema=SOURCE_SCHEMA)


def _image_bytes(value: Any) -> Optional[bytes]:
    """The bytes of an image value: bytes as they are, a Hugging Face ``Image`` struct's
    ``bytes``; None for anything else (that row's error)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _decoded(batch: Mapping[str, np.ndarray], image_column: str, config: SegmentConfig,
             root: Optional[str] = None) -> pa.Table:
    from segpipe.pipeline import decode_limits

    rows = source_rows(batch, image_column, root)
    if schema.PIXELS in rows.column_names:
        return rows
    return decode_batch(rows, ".", decode_limits(config),
                        jpeg_to_predictor=config.decode == "predictor")


@_in_python_terms
def segment(ds, config: ConfigLike = None, image_column: str = "image",
            root: Optional[str] = None, **overrides: Any):
    """``ds`` (rows of a Ray reader) segmented: a lazy ``ray.data.Dataset`` with one row per
    input row in ``schema.PREDICTION_SCHEMA`` (``image_id``, ``file_name``, ``width``,
    ``height``, ``status``, ``error``, ``detections``), made by the same stages as
    ``segpipe segment``. ``file_name`` is the row's ``path`` relative to ``root`` (the
    folder or URI read: then names and image ids are the command line's; ``file_names``),
    or its webdataset ``__key__``. The weights are loaded here, once, and shipped to the
    predictor actors, whose pool starts at one actor and grows as work queues."""
    import ray

    from segpipe.cluster.plan import fit_pool_to_unknown_work, plan_stages
    from segpipe.cluster.session import start_or_join_ray
    from segpipe.cluster.shape import read_cluster_shape
    from segpipe.pipeline import images_per_block, predict_and_encode

    config = as_config(config, **overrides)
    weights = _resolve(config)
    if not ray.is_initialized():
        start_or_join_ray()
    # Ray's readers run tasks of one CPU each; decoding joins them (Ray Data fuses the two),
    # and the plan leaves that CPU free beside the predictors, or the read would never start
    plan = fit_pool_to_unknown_work(plan_stages(config, read_cluster_shape(), read_cpus=1.0))
    decoded = ds.map_batches(_decoded, batch_format="numpy", batch_size=images_per_block(config),
                             fn_kwargs={"image_column": image_column, "config": config,
                                        "root": root},
                             num_cpus=plan.decode_cpus)
    return predict_and_encode(decoded, config, plan, weights.spec, ray.put(weights.payload),
                              weights.categories, soft_mask_dtype=config.soft_mask_dtype)


class Predictor:
    """Mask R-CNN (or a box-only detector) as a callable class for your own ``map_batches``::

        ds.map_batches(segpipe.Predictor, fn_constructor_kwargs={"config": {...}},
                       batch_size=4, compute=ray.data.ActorPoolStrategy(size=2))

    It takes the columns Ray's readers make (``image`` pixels from ``read_images``, or image
    bytes: ``bytes``, ``jpg``, ``png``..., or ``image_column``), keeps every input column,
    and adds segpipe's (``schema.PREDICTION_SCHEMA``): ``image_id``, ``file_name`` (relative
    to ``root``, as ``segment``'s), ``width``, ``height``, ``status``, ``error`` and
    ``detections`` (a list per row of ``{category_id, category_name, score, bbox [x, y, w,
    h], area, segmentation, box, soft_mask, parts}`` dicts, COCO RLE masks; soft masks as
    the config keeps them), exactly as ``segpipe segment`` makes them, so that
    ``write_predictions`` takes its rows as they are. Each call is predicted ``batch_size``
    images (the config's) per forward pass, whatever batch ``map_batches`` hands it.
    Weights load in ``__init__``, once per actor (a checkpoint path must be readable where
    the actors run).
    """

    @_in_python_terms
    def __init__(self, config: ConfigLike = None, image_column: str = "image",
                 use_gpu: Optional[bool] = None, root: Optional[str] = None, **overrides: Any):
        import torch

        from segpipe.encode.encoder import MaskEncoder
        from segpipe.model.stage import PredictStage

        self.config = as_config(config, **overrides)
        self.image_column = image_column
        self.root = root
        weights = _resolve(self.config)
        if use_gpu is None:
            use_gpu = torch.cuda.is_available() and self.config.num_gpus != 0
        self._predict = PredictStage(weights.spec, weights.payload, use_gpu,
                                     self.config.precision, self.config.torch_threads,
                                     canvas=self.config.batch_canvas,
                                     tiling=TileSettings.from_config(self.config),
                                     chunk=self.config.batch_size)
        self._encode = MaskEncoder(self.config.mask_threshold,
                                   keep_soft_masks=self.config.soft_masks,
                                   categories=weights.categories,
                                   soft_mask_dtype=self.config.soft_mask_dtype,
                                   mask_frame=weights.spec.mask_frame)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = _decoded(batch, self.image_column, self.config, self.root)
        step = self.config.batch_size   # images per forward pass, as in segpipe segment
        rows = pa.concat_tables([self._encode(self._predict(decoded.slice(start, step)))
                                 for start in range(0, max(decoded.num_rows, 1), step)])
        out = dict(batch)
        for name in ("image_id", "file_name", "width", "height", "status", "error"):
            out[name] = rows.column(name).to_numpy(zero_copy_only=False)
        detections = [dets or [] for dets in rows.column("detections").to_pylist()]
        out["detections"] = np.array(detections + [None], dtype=object)[:-1]
        return out


def prediction_rows(batch: pa.Table) -> pa.Table:
    """A batch of ``segment``'s or ``Predictor``'s rows as ``schema.PREDICTION_SCHEMA`` rows:
    segpipe's columns only (a ``Predictor`` keeps the user's), in their types."""
    missing = [name for name in schema.PREDICTION_SCHEMA.names if name not in batch.column_names]
    if missing:
        raise ValueError(f"rows without segpipe's columns {', '.join(missing)}: write_predictions "
                         "takes the rows of segpipe.segment or segpipe.Predictor")
    return batch.select(schema.PREDICTION_SCHEMA.names).cast(schema.PREDICTION_SCHEMA)


@_in_python_terms
def write_predictions(ds, output: str, config: ConfigLike = None, rows_per_file: int = 1000,
                      **overrides: Any) -> str:
    """Write a Dataset made by ``segment`` or a ``Predictor`` (with the same ``config``) into
    ``output`` as a run folder: ``predictions/`` with the run settings in every file and the
    ledger of what was committed (segpipe's columns only: ``prediction_rows``), so that
    ``export``, ``segpipe eval`` and ``segpipe render`` read it as they read a ``segpipe
    segment`` OUTPUT. Returns the predictions folder. The rules of OUTPUT
    hold: a folder holding an earlier run is refused unless ``overwrite=True``."""
    import posixpath

    from segpipe.io import lease, ownership, storage
    from segpipe.output import run_folder, sinks
    from segpipe.pipeline import run_settings

    config = as_config(config, **overrides)
    output = storage.absolute(output)
    weights = _resolve(config)
    settings = run_settings(config, weights)
    complete, temporary = run_folder.check_output(output, overwrite=config.overwrite)
    run_folder.create_folder(output, "OUTPUT")
    ownership.mark_folder(output, "segment")
    held = lease.acquire(output)   # one writer per OUTPUT, as for segpipe segment
    try:
        directory = run_folder.predictions_dir(output)
        run_folder.retire_finished_run(output)
        ownership.remove(directory, complete + temporary)
        ownership.record_written(directory, [], whole=True)
        ds.map_batches(prediction_rows, batch_format="pyarrow", batch_size=None).write_datasink(
            sinks.PredictionSink(directory, rows_per_file, settings, output, held.run_id))
        ownership.record_written(directory, [posixpath.basename(p) for p in
                                             run_folder.prediction_files(directory)],
                                 whole=True)
    finally:
        held.release()
    return directory


@dataclass
class ExportResult:
    """What ``export`` wrote: the COCO files (one each, or the shards in order) and their
    index, what went in and what was left out, and how fast."""

    index: str
    instances: list[str]
    results: list[str]
    counts: ExportCounts
    seconds: float
    detections_per_s: Optional[float]
    left_out: list[tuple[int, str]] = field(default_factory=list)


@_in_python_terms
def export(output: str, to: str, score_threshold: float = 0.5,
           mask_threshold: Optional[float] = None, classes: Classes = None,
           max_per_image: Optional[int] = None, min_area: int = 1, polygons: bool = False,
           instances_bbox: str = "mask", address: Optional[str] = None,
           coco_shard_images: int = DEFAULT_COCO_SHARD_IMAGES) -> ExportResult:
    """COCO ``instances.json`` and ``results.json`` (or their shards of ``coco_shard_images``
    images, and ``index.json``) in ``to`` from the run folder ``output`` (a ``segpipe
    segment`` OUTPUT, or ``write_predictions``'), at these thresholds, without the model:
    ``segpipe export``'s options, checked the same way (``ConfigError``)."""
    from segpipe.coco.shards import INDEX_NAME, read_index
    from segpipe.commands.export import check_export, check_export_target, run_export
    from segpipe.io import storage

    if coco_shard_images < 0:
        raise ConfigError(f"coco_shard_images must be >= 0 (0: no shards), got {coco_shard_images}")

    output, to = storage.absolute(output), storage.absolute(to)
    options = ExportOptions(score_threshold=score_threshold, mask_threshold=mask_threshold,
                            max_per_image=max_per_image, min_area=min_area, polygons=polygons,
                            instances_bbox=instances_bbox)
    checked = check_export(output, options, _classes_text(classes))
    check_export_target(to, "coco", output)
    summary = run_export(output, to, checked.options, address=address, checked=checked,
                         shard_images=coco_shard_images)
    counts = ExportCounts(**summary["counts"])
    index = read_index(to)
    if index is None:   # every export writes it last
        raise RuntimeError(f"{to} holds no {INDEX_NAME} after the export")
    shards = index["shards"]
    return ExportResult(storage.join(to, INDEX_NAME),
                        [storage.join(to, shard["instances"]) for shard in shards],
                        [storage.join(to, shard["results"]) for shard in shards],
                        counts, summary["seconds"],
                        summary["detections_per_s"], counts.left_out())


@_in_python_terms
def to_coco(ds, to: str, config: ConfigLike = None, score_threshold: float = 0.5,
            coco_shard_images: int = DEFAULT_COCO_SHARD_IMAGES, **overrides: Any) -> ExportResult:
    """A Dataset made by ``segment`` as COCO files in ``to``: its predictions are written to
    ``to/run/`` (``write_predictions``, kept for re-export at other thresholds) and exported
    from there."""
    from segpipe.io import storage

    run = storage.join(storage.absolute(to).rstrip("/"), "run")
    write_predictions(ds, run, config, **overrides)
    return export(run, to, score_threshold=score_threshold, coco_shard_images=coco_shard_images)


@dataclass
class LabelsResult:
    """What ``export_labels`` wrote: its files (Label Studio task files and config; YOLO's
    data.yaml and lists), what went in and what was left out, and ``export.json``'s summary."""

    files: list[str]
    counts: ExportCounts
    summary: dict[str, Any]


@_in_python_terms
def export_labels(output: str, to: str, format: str, image_root: Optional[str] = None,
                  score_threshold: float = 0.5, mask_threshold: Optional[float] = None,
                  classes: Classes = None, max_per_image: Optional[int] = None,
                  min_area: int = 1, polygons: bool = False, val_fraction: float = 0.1,
                  split_seed: int = 0) -> LabelsResult:
    """Label Studio tasks (``format="label-studio"``; ``image_root``: the images' URL prefix)
    or an Ultralytics YOLO dataset (``format="yolo"``; ``image_root``: the local folder the
    run read, linked from ``to/images``) in ``to`` from the run folder ``output``: ``segpipe
    export --format``'s options, checked the same way (``ConfigError``)."""
    from segpipe.commands.export import ExportFormat, check_export, check_export_target, run_export
    from segpipe.io import storage

    if format not in ("label-studio", "yolo"):
        raise ConfigError(f"format must be label-studio or yolo (COCO: export), got {format!r}")
    export_format = ExportFormat(format, image_root, val_fraction, split_seed)
    export_format.check()
    options = ExportOptions(score_threshold=score_threshold, mask_threshold=mask_threshold,
                            max_per_image=max_per_image, min_area=min_area, polygons=polygons)
    checked = check_export(output, options, _classes_text(classes))
    check_export_target(to, format, output, image_root)
    summary = run_export(output, to, checked.options, checked=checked, export_format=export_format)
    names = summary["task_files"] + [summary["label_config"]] if format == "label-studio" \
        else ["data.yaml", "train.txt", "val.txt"]
    return LabelsResult([storage.join(to, name) for name in names],
                        ExportCounts(**summary["counts"]), summary)


@_in_python_terms
def review_queue(output: str, to: str, score_threshold: float = 0.5, margin: float = 0.15,
           top: Optional[int] = None, subset: Optional[str] = None,
           image_root: Optional[str] = None, images: Optional[str] = None) -> dict[str, Any]:
    """``segpipe review``: rank the run's images for review into ``to`` (``review.jsonl``,
    ``review.csv``), with the first ``top`` as a ``subset`` (``coco`` or ``label-studio``) and
    a gallery when ``images`` (the run's INPUT) is given; returns ``review.json``'s summary."""
    from segpipe.commands.review import ReviewRequest, run_review

    return run_review(ReviewRequest(output, to, score_threshold, margin, top, subset,
                                    image_root, images))

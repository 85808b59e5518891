"""Configuration of a segment run: one dataclass, read from YAML and overridden by flags.

Every field is a YAML key (``conf/default.yaml`` documents each one) and a command-line flag
(``score_floor`` is ``--score-floor``). ``validate`` turns every mistake it can see without a
cluster into a ``ConfigError`` that says what to fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRECISIONS = ("fp32", "fp16", "bf16")
BATCH_CANVASES = ("exact", "fixed")
#: Where JPEGs are decoded (``decode``), the default first.
DECODE_PLACES = ("cpu", "predictor")
#: How soft masks can be stored (``encode.quantise_soft_masks``), the default first.
SOFT_MASK_DTYPES = ("uint16", "float32")

#: The largest ``max_image_pixels``: COCO RLE (pycocotools) counts an image's pixels in 32 bits.
MAX_PIXEL_LIMIT = 2**31 - 1
#: Images per COCO shard unless asked otherwise: about COCO's train2017 (118k images, 450 MB
#: of polygons), the largest COCO file the tools in the loop are known to open whole.
DEFAULT_COCO_SHARD_IMAGES = 100_000
#: The smallest tile: the model's feature maps stride 32 and its anchors start at 32 px.
MIN_TILE = 64


class ConfigError(ValueError):
    """A configuration mistake, found before any work started; the message says what to fix."""


def one_line(problem: object, limit: Optional[int] = None) -> str:
    """``problem`` (an exception, a library's message) as one line of single spaces, cut at
    ``limit`` characters: what a one-line refusal quotes of someone else's text."""
    line = " ".join(str(problem).split())
    return line if limit is None else line[:limit]


def _opt(help_text: str, default: Any, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class SegmentConfig:
    """Everything a ``segpipe segment`` run depends on."""

    input: Optional[str] = _opt("folder or URI (s3://...) searched recursively for images", None,
                                positional=True)
    output: Optional[str] = _opt("folder or URI the run writes predictions/, coco/ and run.json to",
                                 None, positional=True)
    input_format: str = _opt("auto | files (image files) | tar (WebDataset-style shards) | parquet "
                             "(tables with an image-bytes column); auto: from what INPUT holds",
                             "auto", choices=("auto", "files", "tar", "parquet"), metavar="FORMAT")
    image_column: str = _opt("parquet input: the column holding encoded image bytes", "image")
    name_column: Optional[str] = _opt("parquet input: a column naming each image (file_name); "
                                      "unset: <table>#<hash of the bytes>", None)
    arch: str = _opt("the model: a torchvision R-CNN architecture (the fasterrcnn ones find "
                     "boxes only, no masks), ultralytics (an Ultralytics YOLO .pt, detect or "
                     "segment) or transformers (a Hugging Face model folder); docs/models.md",
                     "maskrcnn_resnet50_fpn", metavar="ARCH")
    weights: str = _opt("pretrained (torchvision's COCO weights, from torch's cache or "
                        "downloaded into it: $TORCH_HOME/hub/checkpoints) | PATH of a state_dict "
                        "checkpoint (any number of classes; ultralytics: its .pt; transformers: "
                        "the save_pretrained folder) | an http(s) URL of one | random "
                        "(seeded, smoke runs only)", "pretrained",
                       metavar="pretrained|PATH|URL|random")
    categories: Optional[str] = _opt("names the classes of a checkpoint: a COCO JSON (a dataset "
                                     "with a categories list, or the list itself) or a text "
                                     "file with one name per line; model label k is the k-th "
                                     "category. unset: COCO's table for 91-class models, "
                                     "class_1..class_K-1 otherwise", None, metavar="FILE")
    seed: int = _opt("seed for --weights random", 0)
    min_size: int = _opt("shorter image side after the model's resize (torchvision's R-CNN)", 800)
    max_size: int = _opt("longer image side limit after the model's resize (torchvision's R-CNN)",
                         1333)
    image_size: Optional[int] = _opt("the input size of models that take one (Ultralytics' imgsz; "
                                     "transformers: the processor's shortest side); unset: the "
                                     "model's own (YOLO: the size it was trained at)",
                                     None, metavar="PIXELS")
    score_floor: float = _opt("lowest detection score kept in predictions/ (model box_score_thresh)",
                              0.05)
    score_threshold: float = _opt("lowest detection score written to coco/", 0.5)
    mask_threshold: float = _opt("soft-mask probability above which a pixel is in the mask", 0.5)
    soft_masks: bool = _opt("keep each detection's 28x28 soft mask in predictions/ so that "
                            "`segpipe export` can apply a new mask threshold", True)
    soft_mask_dtype: str = _opt("how soft masks are kept: uint16 (~650 bytes per detection in "
                                "zstd Parquet; re-exported masks within IoU 0.999 of a fresh "
                                "run's on trained-like masks) | float32 (~2,500 bytes; "
                                "re-exported masks pixel for pixel a fresh run's)",
                                SOFT_MASK_DTYPES[0],
                                choices=SOFT_MASK_DTYPES, metavar="DTYPE")
    nms_threshold: float = _opt("IoU of per-class box NMS (model box_nms_thresh)", 0.5)
    detections_per_image: int = _opt("most detections kept per image (box_detections_per_img)", 100)
    proposals_per_image: int = _opt("RPN proposals kept after NMS per image at test time", 1000)
    batch_size: int = _opt("images per predictor call", 4)
    num_gpus: Optional[float] = _opt("GPUs per predictor actor (fractions share a GPU); "
                                     "unset: 1 when the cluster has GPUs, else 0", None)
    actors: str = _opt("predictor actors: N (fixed pool) or MIN-MAX (autoscaling pool); "
                       "auto: one per GPU, or on CPU-only clusters one per CPU (at most one per "
                       "2 GiB of Ray's memory)", "auto")
    cpus_per_actor: Optional[float] = _opt("CPUs Ray reserves for each predictor actor; unset: 1 "
                                           "with GPUs, on CPU-only clusters the CPUs left by "
                                           "decode, encode and write shared among the actors",
                                           None)
    predictor_threads: int = _opt("batches each predictor actor runs at once, each in a thread "
                                  "with its own CUDA stream, so one batch's host work and "
                                  "synchronisations overlap another's kernels (docs/benchmarks.md "
                                  "has the gain measured); each thread holds its own batch's "
                                  "activations in GPU memory",
                                  1)
    torch_threads: int = _opt("torch threads per CPU predictor actor; 0: the cluster's CPUs "
                              "shared among the actors", 0)
    precision: str = _opt("fp32 (bit-identical to torchvision) | bf16 (GPUs, and CPUs with AMX "
                          "or AVX-512 BF16: about 3x faster there) | fp16 (GPUs only); the "
                          "network runs in it, box decoding, anchors, NMS and mask "
                          "probabilities stay fp32", "fp32", choices=PRECISIONS,
                          metavar="PRECISION")
    batch_canvas: str = _opt("how images of different sizes share a predictor batch: exact (each "
                             "padded to its own size as torchvision pads one image; a batch "
                             "holds only equal padded shapes) | fixed (one landscape and one "
                             "portrait canvas, so batches stay full but carry padding)", "exact",
                             choices=BATCH_CANVASES, metavar="CANVAS")
    decode: str = _opt("where JPEGs are decoded: cpu (Ray tasks, with Pillow; the exact "
                       "default) | predictor (a JPEG of three colour components and no EXIF "
                       "turn travels as its bytes, far fewer than its pixels, and the "
                       "predictor decodes it on its device: nvJPEG on a GPU, libjpeg-turbo on a "
                       "CPU, which gives Pillow's pixels; other files are decoded on CPU as "
                       "before; torchvision's models; docs/exactness.md)", DECODE_PLACES[0],
                       choices=DECODE_PLACES, metavar="WHERE")
    max_image_pixels: int = _opt("images with more pixels become error rows (decode limit; "
                                 "a decoded image takes 3 bytes per pixel, see "
                                 "docs/huge-images.md)", 100_000_000)
    tile: int = _opt("slice images larger than SIZE px into SIZE x SIZE tiles, each predicted "
                     "at its own resolution (no resize) and merged per image in full-image "
                     "coordinates (docs/huge-images.md); 0: off", 0, metavar="SIZE")
    tile_overlap: float = _opt("overlap of neighbouring tiles: a fraction of SIZE (< 1) or "
                               "pixels (>= 1)", 0.2, metavar="X")
    tile_full_pass: bool = _opt("with --tile, also predict each tiled image whole, resized by "
                                "min_size/max_size, so objects larger than a tile are found; "
                                "its detections are merged with the tiles'", False)
    tile_merge_threshold: float = _opt("with --tile, same-class detections whose boxes overlap "
                                       "by at least this intersection over the smaller box are "
                                       "one object (SAHI's greedy NMM, IOS)", 0.5)
    tile_join_seams: bool = _opt("with --tile, also join the pieces of an object cut by a tile "
                                 "edge inside the image when their boxes agree (IoU >= "
                                 "tile_merge_threshold) where both tiles see them, and never "
                                 "merge two detections of one tile (its model kept them apart); "
                                 "off: SAHI's merge exactly, which can leave an object larger "
                                 "than the overlap in pieces and glue nested objects of one "
                                 "class", True)
    max_image_bytes: int = _opt("files larger than this many bytes become error rows", 256 << 20)
    rows_per_file: int = _opt("most rows (images) in one predictions/*.parquet file", 1000)
    coco_shard_images: int = _opt("images per COCO shard in coco/ (each a complete COCO "
                                  "dataset; coco/index.json lists them); a run with no more "
                                  "images writes single instances.json and results.json; 0: "
                                  "single files however large", DEFAULT_COCO_SHARD_IMAGES,
                                  metavar="N")
    address: Optional[str] = _opt("Ray cluster to join; unset: RAY_ADDRESS, else a local Ray", None)
    overwrite: bool = _opt("replace the predictions of an earlier run in OUTPUT", False)
    resume: bool = _opt("finish an interrupted run: keep OUTPUT's complete prediction files, "
                        "segment only the images missing from them (same settings required)",
                        False)
    progress: bool = _opt("show progress: a live bar on a terminal, a plain line every 30 s "
                          "otherwise", True)
    fault_kill_after_batches: int = _opt("TESTING ONLY: the first predictor actor kills its own "
                                         "worker process after this many batches (0: never), "
                                         "to show that Ray restarts it and no image is lost", 0,
                                         testing=True)

    def replace(self, **changes: Any) -> "SegmentConfig":
        """Return a copy with ``changes`` applied (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def input_path(self) -> str:
        """INPUT of a run over paths (``validate`` refused a run without it)."""
        if not self.input:
            raise ConfigError("INPUT is missing: give the image folder or URI to segment")
        return self.input

    @property
    def output_path(self) -> str:
        """OUTPUT of a run over paths (``validate`` refused a run without it)."""
        if not self.output:
            raise ConfigError("OUTPUT is missing: give the folder or URI to write results to")
        return self.output


def config_fields() -> list[dataclasses.Field]:
    """The fields of ``SegmentConfig``, in order; the CLI builds its flags from them."""
    return list(dataclasses.fields(SegmentConfig))


def load_config(path: Optional[str | Path] = None, **overrides: Any) -> SegmentConfig:
    """Read ``path`` (YAML; keys are ``SegmentConfig`` fields), apply ``overrides``, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml_config(path)
    config = SegmentConfig(**values).replace(**overrides)
    validate(config)
    return config


#: The largest config file read: a config is a page of keys, not data.
MAX_CONFIG_BYTES = 1 << 20


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Return the keys of a YAML config file; unknown keys are a ``ConfigError``, and so is
    anything that could expand without bound: a file over ``MAX_CONFIG_BYTES``, YAML aliases
    (``*name``: a few hundred bytes of them expand to gigabytes), text that is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES} bytes of keys")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise ConfigError(f"config file {path} uses YAML aliases (*name); write each value "
                              "out instead")
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        problem = one_line(exc, 300)
        raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    check_keys(values, f"config file {path}")
    return values


def check_keys(values: dict[str, Any], where: str) -> None:
    """``ConfigError`` naming the keys of ``values`` that are no ``SegmentConfig`` field, each
    with the closest key (as misspelled flags get), and the keys a user sets (not the
    testing-only ones)."""
    import difflib

    fields = config_fields()
    known = [f.name for f in fields]
    unknown = sorted((str(k) for k in set(values) - set(known)), key=str)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    shown = sorted(f.name for f in fields if not f.metadata.get("testing"))
    raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; valid keys are "
                      f"{', '.join(shown)}")


def parse_actors(actors: str) -> tuple[int, int] | None:
    """Parse ``N`` or ``MIN-MAX`` into ``(min, max)``; ``auto`` gives ``None``."""
    text = str(actors).strip()
    if text == "auto":
        return None
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not match:
        raise ConfigError(f"actors must be N, MIN-MAX or auto, got {actors!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if low < 1 or high < low:
        raise ConfigError(f"actors {actors!r}: need 1 <= MIN <= MAX")
    return low, high


def check_precision_device(precision: str, on_gpu: bool) -> None:
    """fp16 needs CUDA GPUs: refuse it for predictors on CPU (``validate`` when num_gpus is 0,
    ``cluster.plan.plan_stages`` once the cluster decides)."""
    if precision == "fp16" and not on_gpu:
        raise ConfigError("precision fp16 runs on CUDA GPUs only and the predictors would run on "
                          "CPU; use --precision bf16 (fast on CPUs with AMX or AVX-512 BF16) or "
                          "fp32")


def validate(config: SegmentConfig, needs_paths: bool = True) -> None:
    """Raise ``ConfigError`` for any setting that cannot work, naming the key to fix;
    ``needs_paths=False`` (the Python API, which takes a Dataset) does not ask for INPUT and
    OUTPUT."""
    _check_types(config)
    if needs_paths:   # each raises ConfigError when missing
        config.input_path
        config.output_path
    if config.soft_mask_dtype not in SOFT_MASK_DTYPES:
        raise ConfigError(f"soft_mask_dtype must be {' or '.join(SOFT_MASK_DTYPES)}, "
                          f"got {config.soft_mask_dtype!r}")
    if config.batch_canvas not in BATCH_CANVASES:
        raise ConfigError(f"batch_canvas must be exact or fixed, got {config.batch_canvas!r}")
    if config.decode not in DECODE_PLACES:
        raise ConfigError(f"decode must be {' or '.join(DECODE_PLACES)}, got {config.decode!r}")
    if config.num_gpus == 0:
        check_precision_device(config.precision, on_gpu=False)
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {config.precision!r}")
    for name in ("score_floor", "score_threshold", "mask_threshold"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if not 0.0 < config.nms_threshold <= 1.0:
        raise ConfigError(f"nms_threshold must be in (0, 1], got {config.nms_threshold}")
    if config.score_threshold < config.score_floor:
        raise ConfigError(
            f"score_threshold ({config.score_threshold}) is below score_floor "
            f"({config.score_floor}): detections under the floor are never kept, so lower "
            "score_floor or raise score_threshold"
        )
    if config.tile < 0:
        raise ConfigError(f"tile must be 0 (off) or a size in pixels, got {config.tile}")
    if config.image_size is not None and config.image_size < 32:
        raise ConfigError(f"image_size must be at least 32 pixels, got {config.image_size}")
    positive = ("min_size", "max_size", "detections_per_image", "proposals_per_image",
                "batch_size", "predictor_threads", "max_image_pixels", "max_image_bytes", "rows_per_file")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.max_size < config.min_size:
        raise ConfigError(f"max_size ({config.max_size}) must be >= min_size ({config.min_size})")
    if config.max_image_pixels > MAX_PIXEL_LIMIT:
        raise ConfigError(f"max_image_pixels may be at most {MAX_PIXEL_LIMIT} (COCO RLE counts "
                          "an image's pixels in 32 bits)")
    check_tiling(config)
    if config.num_gpus is not None and config.num_gpus < 0:
        raise ConfigError(f"num_gpus must be >= 0, got {config.num_gpus}")
    if config.cpus_per_actor is not None and config.cpus_per_actor <= 0:
        raise ConfigError(f"cpus_per_actor must be > 0, got {config.cpus_per_actor}")
    if config.torch_threads < 0:
        raise ConfigError(f"torch_threads must be >= 0, got {config.torch_threads}")
    parse_actors(config.actors)
    if config.resume and config.overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume keeps earlier "
                          "predictions, overwrite deletes them")
    if config.coco_shard_images < 0:
        raise ConfigError(f"coco_shard_images must be >= 0 (0: no shards), got "
                          f"{config.coco_shard_images}")
    if config.fault_kill_after_batches < 0:
        raise ConfigError("fault_kill_after_batches must be >= 0")


def tile_overlap_pixels(tile: int, overlap: float) -> int:
    """The overlap of neighbouring tiles in pixels: ``int(overlap * tile)`` for a fraction
    (SAHI's rounding), ``overlap`` itself from 1 up."""
    return int(overlap * tile) if overlap < 1 else int(overlap)


def check_tiling(config: SegmentConfig) -> None:
    """Refuse tile settings that cannot slice an image."""
    if config.tile == 0:
        return
    if config.tile < MIN_TILE:
        raise ConfigError(f"tile must be 0 (off) or at least {MIN_TILE} px, got {config.tile}")
    if config.tile_overlap < 0 or (config.tile_overlap >= 1
                                   and config.tile_overlap != int(config.tile_overlap)):
        raise ConfigError(f"tile_overlap must be a fraction in [0, 1) or whole pixels, got "
                          f"{config.tile_overlap}")
    if tile_overlap_pixels(config.tile, config.tile_overlap) >= config.tile:
        raise ConfigError(f"tile_overlap ({config.tile_overlap}) must be less than the tile "
                          f"({config.tile} px)")
    if not 0.0 < config.tile_merge_threshold <= 1.0:
        raise ConfigError(f"tile_merge_threshold must be in (0, 1], got "
                          f"{config.tile_merge_threshold}")


def _check_types(config: SegmentConfig) -> None:
    """YAML gives strings where numbers were meant; say which key, not a TypeError later."""
    for f in config_fields():
        value = getattr(config, f.name)
        if value is None:
            continue
        kind = f.type.replace("Optional[", "").rstrip("]")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, (str, int)),
        }.get(kind, True)
        if not ok:
            expected = {"int": "an integer", "float": "a number", "bool": "true or false",
                        "str": "a string"}[kind]
            raise ConfigError(f"{f.name} must be {expected}, got {value!r}")
        if kind == "float":
            setattr(config, f.name, float(value))
        if kind == "str" and not isinstance(value, str):
            setattr(config, f.name, str(value))

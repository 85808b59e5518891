"""Config: YAML keys, flag overrides, and mistakes reported before any work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from segpipe.cli import build_parser
from segpipe.config import (
    MAX_PIXEL_LIMIT,
    ConfigError,
    SegmentConfig,
    config_fields,
    load_config,
    parse_actors,
    read_yaml_config,
    validate,
)

DEFAULT_YAML = Path(__file__).parent.parent / "conf" / "default.yaml"


def test_default_yaml_documents_every_key_with_its_default():
    values = yaml.safe_load(DEFAULT_YAML.read_text())
    assert list(values) == [f.name for f in config_fields()]
    assert values == SegmentConfig().to_dict()
    text = DEFAULT_YAML.read_text()
    for f in config_fields():
        assert f"{f.name}:" in text and "# " in text.split(f"\n{f.name}:")[0].splitlines()[-1]


def test_every_key_is_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    for f in config_fields():
        if not f.metadata.get("positional"):
            assert "--" + f.name.replace("_", "-") in help_text


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: in\noutput: out\nmin_size: 320\nscore_threshold: 0.7\n")
    config = load_config(path, min_size=256)
    assert (config.min_size, config.score_threshold, config.max_size) == (256, 0.7, 1333)


@pytest.mark.parametrize("text,message", [
    ("input: a\noutput: b\nscore_treshold: 0.7\n", "unknown key(s) score_treshold (did you mean"),
    ("input: a\noutput: b\nmin_size: big\n", "min_size must be an integer"),
    ("input: a\noutput: b\nmask_threshold: 1.5\n", "mask_threshold must be in [0, 1)"),
    ("input: a\noutput: b\nmin_size: 900\nmax_size: 800\n", "max_size (800) must be >= min_size"),
    ("input: a\noutput: b\nactors: 3-2\n", "need 1 <= MIN <= MAX"),
    ("output: b\n", "INPUT is missing"),
    ("- a list\n", "must be a mapping"),
])
def test_mistakes_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_an_unknown_architecture_is_refused_before_any_work_with_the_closest_name(tmp_path):
    """The model families' registry, not config, knows the architectures: the checks before
    any work (``preflight``, the API's ``as_config``) ask it."""
    import segpipe
    from segpipe.commands.preflight import check_segment

    (tmp_path / "in").mkdir()
    config = load_config(None, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                         arch="maskrcnn_resnet50_fnp")
    with pytest.raises(ConfigError, match="did you mean maskrcnn_resnet50_fpn"):
        check_segment(config)
    with pytest.raises(ConfigError, match="arch must be one of"):
        segpipe.as_config({"arch": "resnet"})


def test_actor_ranges():
    assert parse_actors("3") == (3, 3)
    assert parse_actors("1-4") == (1, 4)
    assert parse_actors("auto") is None


def config_with(**changes) -> SegmentConfig:
    return SegmentConfig(**{"input": "in", "output": "out", **changes})


@pytest.mark.parametrize("changes", [
    {"score_floor": 0.0, "score_threshold": 0.0}, {"mask_threshold": 0.0},
    {"score_floor": 0.999, "score_threshold": 0.999}, {"nms_threshold": 1.0},
    {"score_floor": 0.3, "score_threshold": 0.3}, {"min_size": 1, "max_size": 1},
    {"batch_size": 1, "rows_per_file": 1, "detections_per_image": 1, "proposals_per_image": 1,
     "max_image_pixels": 1, "max_image_bytes": 1},
    {"min_size": 640, "max_size": 640}, {"max_image_pixels": MAX_PIXEL_LIMIT},
    {"num_gpus": 0.0}, {"num_gpus": 0.25}, {"cpus_per_actor": 0.01}, {"torch_threads": 0},
    {"resume": True}, {"overwrite": True}, {"input_format": "files"},
    {"input_format": "tar"}, {"input_format": "parquet"}, {"actors": "1-3"},
])
def test_values_on_the_allowed_side_of_every_limit_pass(changes):
    validate(config_with(**changes))


@pytest.mark.parametrize("changes,message", [
    ({"score_floor": -0.01}, "score_floor must be in [0, 1)"),
    ({"score_threshold": 1.0}, "score_threshold must be in [0, 1)"),
    ({"mask_threshold": 1.0}, "mask_threshold must be in [0, 1)"),
    ({"nms_threshold": 0.0}, "nms_threshold must be in (0, 1]"),
    ({"nms_threshold": 1.01}, "nms_threshold must be in (0, 1]"),
    ({"score_floor": 0.31, "score_threshold": 0.3}, "score_threshold (0.3) is below score_floor"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"rows_per_file": 0}, "rows_per_file must be at least 1"),
    ({"min_size": 641, "max_size": 640}, "max_size (640) must be >= min_size (641)"),
    ({"max_image_pixels": MAX_PIXEL_LIMIT + 1}, "max_image_pixels may be at most"),
    ({"num_gpus": -0.5}, "num_gpus must be >= 0"),
    ({"cpus_per_actor": 0.0}, "cpus_per_actor must be > 0"),
    ({"torch_threads": -1}, "torch_threads must be >= 0"),
    ({"resume": True, "overwrite": True}, "resume and overwrite exclude each other"),
    ({"precision": "fp8"}, "precision must be one of fp32, fp16, bf16"),
    ({"fault_kill_after_batches": -1}, "fault_kill_after_batches must be >= 0"),
    ({"output": None}, "OUTPUT is missing"),
])
def test_values_past_every_limit_are_refused_with_the_key_to_fix(changes, message):
    with pytest.raises(ConfigError) as info:
        validate(config_with(**changes))
    assert message in str(info.value)


@pytest.mark.parametrize("key,value,message", [
    ("score_floor", "high", "score_floor must be a number, got 'high'"),
    ("score_floor", True, "score_floor must be a number, got True"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("batch_size", True, "batch_size must be an integer, got True"),
    ("soft_masks", "yes", "soft_masks must be true or false, got 'yes'"),
    ("weights", ["a"], "weights must be a string, got ['a']"),
])
def test_yaml_values_of_the_wrong_type_name_their_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        validate(config_with(**{key: value}))
    assert str(info.value) == message


def test_yaml_numbers_and_names_are_coerced_where_that_is_safe():
    config = config_with(score_floor=0, score_threshold=1 - 1, name_column=2024, num_gpus=1)
    validate(config)
    assert isinstance(config.score_floor, float) and config.score_floor == 0.0
    assert config.name_column == "2024" and isinstance(config.num_gpus, float)


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: a\noutput: b\nscore_treshold: 0.7\nbatchsize: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert (f"config file {path}: unknown key(s) batchsize (did you mean batch_size?), "
            "score_treshold (did you mean score_threshold?); valid keys are ") in text
    assert "actors, address, arch, " in text
    assert "fault_kill_after_batches" not in text   # a testing-only key is not offered
    assert load_config(None, input="a", output="b").input == "a"


@pytest.mark.parametrize("content,expected", [
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ninput: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     "uses YAML aliases"),
    (b"input: caf\xe9\n", "is not UTF-8 text"),
    (b"input: x\n" + b"#" * (1 << 20), "a config is at most"),
    (b"input: [unclosed\n", "is not valid YAML"),
])
def test_configs_that_would_expand_or_cannot_be_read_fail_in_one_line(tmp_path, content,
                                                                        expected):
    path = tmp_path / "bomb.yaml"
    path.write_bytes(content)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        read_yaml_config(path)
    assert expected in str(refused.value) and "\n" not in str(refused.value)
    assert time.perf_counter() - start < 5


def test_a_million_categories_are_refused_before_they_are_read(tmp_path):
    from segpipe.model.categories import CategoryError, MAX_CATEGORIES, load_categories

    many = tmp_path / "classes.txt"
    many.write_text("".join(f"class{i}\n" for i in range(MAX_CATEGORIES + 1)))
    with pytest.raises(CategoryError, match=f"at most {MAX_CATEGORIES}"):
        load_categories(str(many))
    huge = tmp_path / "huge.txt"
    huge.write_text("".join(f"class{i}\n" for i in range(1_000_000)))
    with pytest.raises(CategoryError, match="bytes, over the"):
        load_categories(str(huge))

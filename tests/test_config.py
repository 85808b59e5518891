"""Config: YAML keys, flag overrides, and mistakes reported before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segpipe.cli import build_parser
from segpipe.config import ConfigError, SegmentConfig, config_fields, load_config, parse_actors

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
    ("input: a\noutput: b\nscore_treshold: 0.7\n", "unknown key(s) score_treshold"),
    ("input: a\noutput: b\nmin_size: big\n", "min_size must be an integer"),
    ("input: a\noutput: b\nmask_threshold: 1.5\n", "mask_threshold must be in [0, 1)"),
    ("input: a\noutput: b\nmin_size: 900\nmax_size: 800\n", "max_size (800) must be >= min_size"),
    ("input: a\noutput: b\nactors: 3-2\n", "need 1 <= MIN <= MAX"),
    ("input: a\noutput: b\narch: resnet\n", "arch must be one of"),
    ("output: b\n", "INPUT is missing"),
    ("- a list\n", "must be a mapping"),
])
def test_mistakes_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_actor_ranges():
    assert parse_actors("3") == (3, 3)
    assert parse_actors("1-4") == (1, 4)
    assert parse_actors("auto") is None

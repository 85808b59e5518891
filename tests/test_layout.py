"""The house flows one way: no package of segpipe imports one that imports it back."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "segpipe"


def package_imports() -> dict[str, dict[str, list[str]]]:
    """package → package it imports → the modules that do (``segpipe/x/y.py`` is package x,
    ``segpipe/z.py`` is z; the public facade ``segpipe/__init__.py`` is left out: it only
    names the API, loaded on first use)."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative == Path("__init__.py"):
            continue
        package = relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] != "segpipe" or len(parts) < 2:
                    continue
                other = parts[1]
                if other != package:
                    edges[package][other].append(str(relative))
    return edges


def test_no_package_imports_one_that_imports_it():
    edges = package_imports()
    circles = []

    def visit(package: str, path: list[str]) -> None:
        for other in edges.get(package, {}):
            if other in path:
                circles.append(path[path.index(other):] + [other])
            elif len(path) < 12:
                visit(other, path + [other])

    for package in list(edges):
        visit(package, [package])
    assert not circles, {" -> ".join(c): [m for a, b in zip(c, c[1:]) for m in edges[a][b]][:6]
                         for c in circles[:5]}


def test_the_export_formats_are_one_module_each():
    from segpipe.annotations.formats import FORMATS, writer

    for name in FORMATS:
        module = writer(name)
        for attribute in ("WRITES", "check_request", "check_target", "write", "notes"):
            assert hasattr(module, attribute), (name, attribute)


def test_the_input_formats_are_a_registry_and_a_wrong_name_is_one_line(tmp_path):
    import pytest

    from segpipe.config import ConfigError
    from segpipe.io.formats import INPUT_FORMATS, list_inputs

    for name, entry in INPUT_FORMATS.items():
        containers = entry.suffix is not None
        assert entry.name == name and (entry.read is not None) == containers
        assert (entry.images is not None) == containers and (entry.container != "") == containers
    with pytest.raises(ConfigError, match=r"input_format must be auto, files, tar, parquet, got 'tars'; "
                                          r"did you mean tar\?") as refused:
        list_inputs(str(tmp_path / "nowhere"), "tars")
    assert "\n" not in str(refused.value)

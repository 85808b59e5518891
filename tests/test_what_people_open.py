"""Nothing injected into what people open: spreadsheets, XML, YAML, line lists, terminals.
(Hostile world, round three, part 3.)"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from segpipe import cli
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import ExportFormat, run_export
from segpipe.model.categories import Category, CategoryTable
from synthetic import SETTINGS, box_detection, image_row, write_predictions


def table_of(*names: str) -> CategoryTable:
    return CategoryTable(tuple(Category(k, name) for k, name in enumerate(names, start=1)),
                         tuple(range(1, len(names) + 1)), len(names) + 1, "file")


def run_of(folder: Path, names: tuple[str, ...], file_names: list[str]) -> Path:
    settings = replace(SETTINGS, categories=table_of(*names))
    rows = []
    for k, file_name in enumerate(file_names):
        dets = []
        for c, name in enumerate(names, start=1):
            det = box_detection(c, 0.5 + 0.4 * ((k + c) % 2), 4 * c, 4, 8, 8, 48, 64)
            dets.append({**det, "category_id": c, "category_name": name})
        rows.append(image_row(file_name, 64, 48, dets))
    write_predictions(folder, rows, settings=settings)
    return folder


FORMULAS = ["=HYPERLINK(\"evil.example\",\"y\").jpg", "+1+2.jpg", "-3.jpg", "@SUM(A1).jpg"]


def test_review_csv_cells_never_start_a_formula(tmp_path, capsys):
    run = run_of(tmp_path / "run", ("=cmd|' /C calc'!A0", "cat"), FORMULAS + ["plain.jpg"])
    assert cli.main(["review", str(run), "--to", str(tmp_path / "r"), "--margin", "0.5"]) == 0
    with open(tmp_path / "r" / "review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file_name"] for r in rows} == {"'" + n for n in FORMULAS} | {"plain.jpg"}
    for row in rows:
        for value in row.values():
            assert not value or value[0] not in "=+-@\t\r", value
    jsonl = [json.loads(line) for line in (tmp_path / "r" / "review.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in jsonl} == set(FORMULAS) | {"plain.jpg"}   # JSON keeps names


@pytest.mark.parametrize("bad", ["x\x0by", "esc\x1b[31m", "nul\x00", "bom\ufffe", "c1\x85",
                                 "csi\x9b", "line\u2028", "rtl\u202e"])
def test_a_name_no_file_can_hold_is_refused_in_the_runs_table(tmp_path, capsys, bad):
    run = run_of(tmp_path / "run", ("cat", bad), ["a.jpg"])
    code = cli.main(["export", str(run), "--to", str(tmp_path / "ls"), "--format", "label-studio",
                     "--image-root", "/x/"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "category table recorded with the run" in err
    assert "\x1b" not in err and not (tmp_path / "ls").exists()


def test_names_that_are_awkward_but_valid_survive_xml_and_yaml(tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    names = ("a: b", "#hash", "quote'\"", "<tag>&", "日本語", "- dash", "yes", "null", "1.5",
             "tab here", "emoji 🐱")
    run = run_of(tmp_path / "run", names, ["a.jpg"])
    run_export(str(run), str(tmp_path / "yolo"), ExportOptions(0.5), export_format=ExportFormat("yolo"))
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text(encoding="utf-8"))
    assert data["names"] == dict(enumerate(names))
    run_export(str(run), str(tmp_path / "ls"), ExportOptions(0.5),
               export_format=ExportFormat("label-studio", "/x/"))
    config = (tmp_path / "ls" / "label_config.xml").read_text(encoding="utf-8")
    interface = LabelInterface(config)
    assert interface.get_control("label").labels == list(names)


@pytest.mark.parametrize("text", ['[{"id": 1, "name": "cat\\ud800"}]', "cat\ndog\x1b]0;x\x07\n",
                                  "cat\ndog\x85bird\n", "cat\n" + "a" * 2_000_000 + "\n"])
def test_a_categories_file_with_such_a_name_stops_segment_before_any_work(tmp_path, capsys, text):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "classes.txt").write_text(text, encoding="utf-8", errors="surrogatepass")
    code = cli.main(["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random",
                     "--categories", str(tmp_path / "classes.txt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and ("holds the character" in err or
                                              "2,000,000 characters long" in err)
    assert "\x1b" not in err and not (tmp_path / "out").exists() and len(err) < 1000


def test_terminal_lines_escape_what_names_carry(tmp_path, capsys):
    """A tampered image row's name reaches the terminal only escaped."""
    rows = [image_row("good.jpg", 64, 48, [box_detection(1, 0.9, 4, 4, 20, 10, 48, 64)]),
            image_row("\x1b]0;owned\x07\x1b[31mred.jpg", 64, 48, [])]
    write_predictions(tmp_path / "run", rows)
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;owned\\x07\\x1b[31mred.jpg" in out

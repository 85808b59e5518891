"""The OUTPUT folder of a segment run: where each file lives, and what is already there.

``OUTPUT/predictions/part-*.parquet`` (the run's rows; a file is complete when it has this
name), ``OUTPUT/coco/``, ``OUTPUT/run.json`` and ``OUTPUT/logs/``. Reading what is there
(the prediction files, the settings recorded in them, the ids already done) needs only
pyarrow, so commands can check OUTPUT before they import torch or start Ray.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from segpipe.config import ConfigError
from segpipe.io import lease, ownership, storage
from segpipe.model.settings import RunSettings

PREDICTIONS_DIR = "predictions"
COCO_DIR = "coco"
LOGS_DIR = "logs"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


RUN_JSON = "run.json"


COCO_FILES = ("instances.json", "results.json")
#: Every name a COCO export writes in its folder: the files above, their shards
#: (``instances-00000-of-00012.json``...) and ``index.json`` (``ownership`` checks them before
#: replacing; ``coco.shards`` names them).
COCO_NAME = re.compile(r"(?:(?:instances|results)(?:-\d{5,}-of-\d{5,})?|index)\.json")


def predictions_dir(output: str) -> str:
    """The predictions folder of a segment run's OUTPUT (a path or URI)."""
    return storage.join(output.rstrip("/"), PREDICTIONS_DIR)


def coco_dir(output: str) -> str:
    return storage.join(output.rstrip("/"), COCO_DIR)


def prediction_files(directory: str) -> list[str]:
    """The complete prediction files in ``directory``, by their name (``part-<32 hex>.parquet``,
    not in a subfolder, not a link; temporary files are not listed), sorted."""
    fs, root = storage.resolve(directory)
    if not storage.is_dir(fs, root):
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root))
                  if i.type == pafs.FileType.File and ownership.PART_NAME.fullmatch(i.base_name)
                  and ownership.linked_part(i.path) is None)


def existing_predictions(output: str) -> str:
    """``predictions_dir(output)``, verified (``verify_predictions``); a ``ConfigError`` when
    it holds no prediction file, or not what its run committed."""
    directory = predictions_dir(output)
    lease.check_not_being_written(output)   # a run in progress: not finished, not damaged
    if not prediction_files(directory):
        raise ConfigError(f"{directory} holds no prediction files; run `segpipe segment` into "
                          f"{output} first")
    verify_predictions(directory)
    return directory


#: How many paths a line about predictions/ names per kind of problem.
NAMED = 3


def verify_predictions(directory: str, resuming: bool = False) -> None:
    """Check that ``directory`` holds what its run committed, before anything is read from it
    or written: ``ConfigError`` in one line naming every kind of problem with examples:

    * missing: a file the run recorded when it finished (the ledger of predictions/) is gone;
    * damaged: a file whose footer cannot be read, or whose size is not the recorded size;
    * foreign: anything not segpipe's (``ownership.prediction_entries``): a backup beside a
      file, a copy in a subfolder, a link;
    * not recorded: a complete file the finished run did not record (a copy under a new
      name, or the work of a run killed later: ``--resume`` finishes it);
    * duplicated: an image in more than one file.

    ``resuming``: what a resume heals (missing and unrecorded files) is not a problem."""
    complete, _, other = ownership.prediction_entries(directory)
    fs, root = storage.resolve(directory)
    damaged = [p for p in other if ownership.PART_NAME.fullmatch(posixpath.basename(p))
               and posixpath.dirname(p) == root.rstrip("/")]
    problems = {"damaged": damaged, "not segpipe's": [p for p in other if p not in damaged]}
    ledger = ownership.recorded(directory)
    if ledger is not None:
        names = {posixpath.basename(p): p for p in complete}
        sizes = {name: fs.get_file_info(path).size for name, path in names.items()
                 if name in ledger}
        problems["damaged"] += [names[n] for n, size in sizes.items() if size != ledger[n][0]]
        if not resuming:
            problems["missing"] = [storage.join(root, n) for n in sorted(ledger)
                                   if n not in names and n not in {posixpath.basename(p)
                                                                   for p in other}]
            problems["not recorded by the finished run"] = [p for n, p in names.items()
                                                           if n not in ledger]
    problems["with images also in another file"] = _files_sharing_images(
        fs, [p for p in complete if p not in problems["damaged"]])
    def shown(paths: list[str]) -> str:
        names = [posixpath.basename(p) if posixpath.dirname(p) == root.rstrip("/") else p
                 for p in sorted(paths)]
        return ", ".join(names[:NAMED]) + (", ..." if len(names) > NAMED else "")

    found = [f"{len(paths)} {what} ({shown(paths)})" for what, paths in problems.items() if paths]
    if found:
        raise ConfigError(f"{directory} does not hold what its run committed: "
                          f"{'; '.join(found)}. segpipe removes nothing there: restore or move "
                          "these files, or rerun `segpipe segment` with --resume (to finish a "
                          "run) or --overwrite")


def _files_sharing_images(fs: pafs.FileSystem, paths: list[str]) -> list[str]:
    """The files among ``paths`` that hold an image_id some other file holds too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(paths) < 2:
        return []
    ids, files = [], []
    for k, path in enumerate(paths):
        with fs.open_input_file(path) as f:
            column = pq.read_table(f, columns=["image_id"]).column("image_id")
        ids.append(column)
        files.append(pa.array([k] * len(column), pa.int32()))
    table = pa.table({"id": pa.chunked_array([c for i in ids for c in i.chunks],
                                             pa.int64()),
                      "file": pa.chunked_array(files)})
    counts = table.group_by("id").aggregate([("file", "count_distinct")])
    shared = counts.filter(pc.field("file_count_distinct") > 1).column("id")
    if not len(shared):
        return []
    holders = table.filter(pc.is_in(table.column("id"), value_set=shared)).column("file")
    return [paths[k] for k in sorted(set(holders.to_pylist()))]


def read_written(directory: str) -> tuple[Optional[RunSettings], set[int]]:
    """The settings recorded in the complete prediction files of ``directory`` and the
    ``image_id`` of every row in them (what ``--resume`` needs), after ``verify_predictions``.

    Raises ``ConfigError`` when files disagree (predictions of different runs mixed).
    """
    verify_predictions(directory, resuming=True)
    fs, _ = storage.resolve(directory)
    found: set[Optional[RunSettings]] = set()   # None: a file without settings
    ids: set[int] = set()
    for path in prediction_files(directory):
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["image_id"])
        found.add(_recorded_settings(path, table.schema.metadata))
        ids.update(table.column("image_id").to_pylist())
    return _one_settings(directory, found), ids


def read_run_settings(directory: str) -> Optional[RunSettings]:
    """The settings recorded in the prediction files of ``directory``.

    Raises ``ConfigError`` when files disagree (predictions of different runs mixed).
    """
    fs, _ = storage.resolve(directory)
    found: set[Optional[RunSettings]] = set()   # None: a file without settings
    for path in prediction_files(directory):
        with fs.open_input_file(path) as f:
            found.add(_recorded_settings(path, pq.read_schema(f).metadata))
    return _one_settings(directory, found)


def _recorded_settings(path: str, metadata: Optional[dict]) -> Optional[RunSettings]:
    """``RunSettings.from_metadata``, its refusal naming the file."""
    try:
        return RunSettings.from_metadata(metadata)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _one_settings(directory: str, found: set[Optional[RunSettings]]) -> Optional[RunSettings]:
    if len(found) > 1:
        raise ConfigError(f"{directory} mixes predictions made with different settings; keep "
                          "the files of one run only")
    return found.pop() if found else None


def check_output(output: str, resume: bool = False,
                 overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Refuse an OUTPUT that cannot take a new run, before any work: a file, a folder that
    cannot be created or written, a symbolic link where the run writes, a file the run would
    replace or remove that segpipe did not write (``ownership``), or one holding an earlier
    run's predictions (unless ``resume`` or ``overwrite``).

    Returns segpipe's own files in predictions/ that the run removes (complete, temporary):
    all of them for a fresh run or ``overwrite``, the temporary ones for ``resume``."""
    check_folder_target(output, "OUTPUT",
                        " (the run writes predictions/, coco/ and run.json into it)")
    ownership.refuse_links(output, [PREDICTIONS_DIR, COCO_DIR, LOGS_DIR],
                           "OUTPUT's predictions/, coco/ and logs/ must be folders inside it")
    predictions = predictions_dir(output)
    fs, path = storage.resolve(predictions)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise ConfigError(f"{predictions} is a file; OUTPUT must be a segpipe output folder")
    ownership.check_replaceable(output, [RUN_JSON])
    ownership.check_replaceable(coco_dir(output), COCO_FILES, matching=COCO_NAME)
    if resume:
        return [], ownership.prediction_entries(predictions)[1]
    old, temporary = ownership.check_clearable(predictions)
    if old and not overwrite:
        raise ConfigError(f"{predictions} already holds {len(old)} prediction file(s) from an "
                          "earlier run; pass --resume to finish it, --overwrite to replace it, "
                          "or choose another OUTPUT")
    return old, temporary


def _place(uri: str) -> tuple[str, str]:
    """Where ``uri`` is, to compare folders: its filesystem's kind and its path, normalised
    (a local path with its links resolved: a link to a folder is that folder)."""
    head = storage.split_options(uri)[0]
    if "://" not in head:
        return "local", os.path.realpath(head)
    scheme, _, path = head.partition("://")   # as written: resolving a bucket asks the network
    bucket, _, key = path.partition("/")
    return scheme.lower(), posixpath.normpath(f"/{bucket.rpartition('@')[2]}/{key}".rstrip("/"))


def _within(place: tuple[str, str], folder: tuple[str, str]) -> bool:
    """Whether ``place`` is ``folder`` or inside it."""
    return place[0] == folder[0] and (place[1] == folder[1] or
                                      place[1].startswith(folder[1].rstrip("/") + "/"))


def check_target(target: str, what: str, output: Optional[str] = None,
                 inputs: tuple[Optional[str], ...] = ()) -> None:
    """Refuse a folder a command would write into (``what``: ``--to``, ``OUTPUT``) that is a
    run's own: ``output`` itself, or its predictions/, coco/ or logs/ or a folder inside them
    (writing there would make the run's files look foreign to every later command); or one
    of ``inputs`` (a run's INPUT, an --image-root): segpipe's ledger marks the folder it
    writes as an output, which a later ``segment`` of that INPUT leaves out. ``ConfigError``
    in one line naming the clash."""
    place = _place(target)
    if output is not None:
        if place == _place(output):
            raise ConfigError(f"{what} {target} is the run's OUTPUT {output}: give a folder of its own "
                              f"(e.g. {storage.join(output.rstrip('/'), 'labels')})")
        for own in (PREDICTIONS_DIR, COCO_DIR, LOGS_DIR):
            folder = storage.join(output.rstrip("/"), own)
            if _within(place, _place(folder)):
                raise ConfigError(f"{what} {target} is inside the run's own {own}/ ({folder}), which "
                                  "holds only what `segpipe segment` writes: give another folder")
    for given in inputs:
        if given and place == _place(given):
            raise ConfigError(f"{what} {target} is the folder of the images ({given}): segpipe "
                              "would mark it as an output folder, and a later `segpipe segment` of "
                              "it would find no image; give another folder")


def recorded_config(output: str) -> dict[str, str]:
    """The string settings of the run in ``output`` as its run.json records them (``input``,
    ``image_column``, ...); those that cannot be read, or are not strings, are left out:
    run.json is untrusted, and only ever a hint."""
    fs, root = storage.resolve(output)
    try:
        config = json.loads(storage.read_bytes(fs, storage.join(root, RUN_JSON))).get("config")
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {key: value for key, value in config.items() if isinstance(value, str)}


def run_input(output: str) -> Optional[str]:
    """The INPUT the run in ``output`` segmented (its run.json), when that can be read."""
    return recorded_config(output).get("input")


def retire_finished_run(output: str) -> None:
    """Remove what marks the run in ``output`` as finished, segpipe's own files only
    (``ownership.remove_recorded``): run.json and coco/'s files. A run does this before it
    changes predictions/, so that a run killed on the way (a SIGKILL of an --overwrite) never
    leaves an earlier run's coco/ and run.json beside predictions/ they no longer describe;
    the run writes them again when it finishes."""
    ownership.remove_recorded(output, [RUN_JSON])
    coco = coco_dir(output)
    ownership.remove_recorded(coco, [name for name in ownership.recorded(coco) or {}
                                     if COCO_NAME.fullmatch(name)])


def create_folder(folder: str, what: str) -> None:
    """Create ``folder`` (a path or URI) now, so that a run cannot fail on it after its work;
    ``ConfigError`` with the reason when that is impossible."""
    fs, root = storage.resolve(folder)
    try:
        fs.create_dir(root, recursive=True)
    except Exception as exc:  # OSError locally; pyarrow's own errors for object stores
        raise ConfigError(f"{what} {folder} cannot be created: {exc}") from None


def check_folder_target(folder: str, what: str, purpose: str = "") -> None:
    """Refuse a folder to write into that is a file, or cannot be created or written;
    ``purpose`` ends the message about a file."""
    fs, root = storage.resolve(folder)
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise ConfigError(f"{what} {folder} is a file; give a folder{purpose}")
    if isinstance(fs, pafs.LocalFileSystem):
        _check_local_folder_writable(Path(root), folder)


def _check_local_folder_writable(path: Path, given: str) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{given} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{given} cannot be written: no write permission on {existing}")

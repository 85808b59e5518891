"""What segpipe may replace or remove: only files it can prove it wrote, never through a link.

Proof is a name segpipe gives *and* something segpipe wrote into or about the file:

* a prediction file: ``part-<32 hex>.parquet`` directly in ``predictions/``, whose Parquet
  footer records segpipe's run settings (``schema.RUN_SETTINGS_KEY``);
* a file still being written (a killed run's): ``.<name>.<12 hex>.tmp`` for a name segpipe
  writes in that folder, empty or beginning as that format begins (Parquet's ``PAR1``);
* a file a command writes whole (``coco/*.json``, ``run.json``, ``export.json``, ``eval.json``,
  ``render.json``, ``index.html``): listed with its size and modification time in the
  ledger ``.segpipe-files.json`` of its folder, which segpipe updates after writing it;
* a rendered image: a JPEG under ``images/`` whose comment is ``RENDER_COMMENT``;
* one of many small files of a folder (a YOLO dataset's label files): listed with its size
  and modification time in the folder's stamps table ``.segpipe-stamps.parquet`` (itself in
  the ledger), read once as Arrow columns however many files it lists (``read_stamps``).

A foreign file where segpipe would write or remove, or a symbolic link on the way (on a local
disk nothing is followed through a link), is refused before any work: ``ConfigError`` naming
the paths. The ledger also marks a folder as a segpipe output (``is_output_folder``), which
is how ``sources`` leaves such folders out of an INPUT: all of it, but for what the folder
held before segpipe first wrote into it (``found_before``: the user's own entries, such as
the images of an INPUT below a ``--to`` folder).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import time
from typing import Iterable, Optional, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from segpipe.config import ConfigError
from segpipe.io import storage
from segpipe.version import __version__

LEDGER_NAME = ".segpipe-files.json"
STAMPS_NAME = ".segpipe-stamps.parquet"
LEDGER_KEY = "segpipe_files"
#: The files by which segpipe keeps account of a folder's files.
BOOKKEEPING_NAMES = (LEDGER_NAME, STAMPS_NAME)
#: The comment segpipe writes into every JPEG that ``render`` draws.
RENDER_COMMENT = b"segpipe render"
#: A temporary file untouched this long belongs to a writer that is gone.
STALE_TEMPORARY_S = 600.0
PART_NAME = re.compile(r"part-[0-9a-f]{32}\.parquet")
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-)?[0-9a-f]{12}"
                            + re.escape(storage.TEMPORARY_SUFFIX))


#: How many foreign paths a refusal names.
SHOWN = 5
#: The ledger's list of the entries a folder held before segpipe first wrote into it.
FOUND_KEY = "found_before"
#: The most entries ``FOUND_KEY`` lists; a folder holding more is left out of an INPUT whole.
FOUND_LIMIT = 10_000


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def linked_part(folder: str, relative: str = "") -> Optional[str]:
    """The first of ``folder/relative`` and the folders between them that is a symbolic link
    (on a local disk; None elsewhere or when there is none). ``folder`` itself counts only
    when ``relative`` is empty: the folder a user names may be a link, what is inside it not."""
    fs, root = storage.resolve(folder)
    if not _is_local(fs):
        return None
    parts = [p for p in relative.split("/") if p]
    paths = [os.path.join(root, *parts[:i]) for i in range(1, len(parts) + 1)] if parts \
        else [root]
    for path in paths:
        if os.path.islink(path):
            return path
    return None


def refuse_links(folder: str, relatives: Iterable[str], what: str) -> None:
    """``ConfigError`` when one of ``folder/relative`` (or a folder on the way) is a link."""
    for relative in relatives:
        link = linked_part(folder, relative)
        if link is not None:
            raise ConfigError(f"{link} is a symbolic link, and segpipe neither writes nor removes "
                              f"through links ({what}); move the link away, or name the place "
                              "it points to instead")


def refusal(foreign: list[str], where: str, action: str) -> ConfigError:
    shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more"
                                         if len(foreign) > SHOWN else "")
    return ConfigError(f"{where} holds {len(foreign)} file(s) segpipe did not write, which it "
                       f"would {action}: {shown}; move them away or choose another folder")


def _ledger(fs: pafs.FileSystem, root: str) -> dict:
    """The ledger of the folder ``root`` ({} when there is none); ``ConfigError`` when a file
    of its name is there and is not segpipe's ledger."""
    path = storage.join(root, LEDGER_NAME)
    try:
        data = json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get(LEDGER_KEY), dict):
        raise ConfigError(f"{path} is not segpipe's ledger of its files; move it away")
    return data


def _stamp(info: pafs.FileInfo) -> list:
    return [info.size, info.mtime_ns]


def _write_ledger(fs: pafs.FileSystem, root: str, ledger: dict) -> None:
    body = {**ledger, "segpipe": __version__}
    storage.write_bytes_atomic(fs, storage.join(root, LEDGER_NAME),
                               json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")


def mark_folder(folder: str, kind: str) -> None:
    """Make ``folder`` a segpipe output of ``kind`` (segment, export, render): create it and
    its ledger unless it has one. The ledger lists what the folder held already (up to
    ``FOUND_LIMIT`` entries, ``FOUND_KEY``): the user's, which a later INPUT listing keeps."""
    fs, root = storage.resolve(folder)
    fs.create_dir(root, recursive=True)
    if not _ledger(fs, root):
        found = sorted(i.base_name for i in
                       fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))
        ledger: dict = {"kind": kind, LEDGER_KEY: {}}
        if found and len(found) <= FOUND_LIMIT:
            ledger[FOUND_KEY] = found
        _write_ledger(fs, root, ledger)


def found_before(fs: pafs.FileSystem, root: str) -> Optional[frozenset[str]]:
    """The entries the output folder ``root`` held before segpipe first wrote into it (its
    ledger's ``FOUND_KEY``; none for a folder segpipe made, or whose ledger is older); None
    when ``root`` is no segpipe output (``is_output_folder``), from one read of its ledger."""
    try:
        ledger = _ledger(fs, root)
    except ConfigError:
        return None
    if not ledger:
        return None
    found = ledger.get(FOUND_KEY)
    return frozenset(name for name in found if isinstance(name, str)) \
        if isinstance(found, list) else frozenset()


def record_written(folder: str, names: Iterable[str], whole: bool = False) -> None:
    """Enter the files ``folder/name`` (just written by segpipe) in the folder's ledger;
    ``whole``: they are all the folder holds (earlier entries are dropped)."""
    fs, root = storage.resolve(folder)
    ledger = _ledger(fs, root) or {"kind": "files", LEDGER_KEY: {}}
    files = {} if whole else dict(ledger[LEDGER_KEY])
    names = list(names)
    if len(names) > 8:   # one listing rather than a request per file
        listed = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(root))}
        infos = [listed.get(name) for name in names]
    else:
        infos = [fs.get_file_info(storage.join(root, name)) for name in names]
    for name, info in zip(names, infos):
        if info is not None and info.type == pafs.FileType.File:
            files[name] = _stamp(info)
    _write_ledger(fs, root, {**ledger, LEDGER_KEY: files})


def write_json(folder: str, name: str, value) -> None:
    """``storage.write_json_atomic`` and the ledger entry of the file, in one."""
    storage.write_json_atomic(folder, name, value)
    record_written(folder, [name])


def recorded(folder: str) -> Optional[dict[str, list]]:
    """The files the ledger of ``folder`` lists, ``{name: [size, mtime_ns]}``; None when the
    folder has no ledger."""
    fs, root = storage.resolve(folder)
    ledger = _ledger(fs, root)
    return dict(ledger[LEDGER_KEY]) if ledger else None


def is_output_folder(fs: pafs.FileSystem, root: str) -> bool:
    """Whether the folder ``root`` is a segpipe output (it holds segpipe's ledger)."""
    try:
        return bool(_ledger(fs, root))
    except ConfigError:
        return False


def check_replaceable(folder: str, names: Iterable[str],
                      matching: Optional[re.Pattern] = None) -> None:
    """Refuse (``ConfigError``, naming them) to replace files under ``folder`` that are there
    and not proven segpipe's by the ledger, and any link on the way to them; with
    ``matching``, also every entry of ``folder`` whose name it matches (files whose names
    depend on what is written: COCO shards)."""
    fs, root = storage.resolve(folder)
    names = list(names)
    if matching is not None and storage.is_dir(fs, root):
        names += sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                        if matching.fullmatch(i.base_name) and i.base_name not in names)
    refuse_links(folder, names, f"it is on the way to what segpipe writes in {folder}")
    entries = None
    foreign = []
    for name in names:
        path = storage.join(root, name)
        info = _lstat(fs, path)
        if info is None:
            continue
        entries = _ledger(fs, root).get(LEDGER_KEY, {}) if entries is None else entries
        if info.type != pafs.FileType.File or entries.get(name) != _stamp(info):
            foreign.append(path)
    if foreign:
        raise refusal(foreign, folder, "replace")


def read_stamps(folder: str) -> pa.Table:
    """The stamps table of ``folder`` (``name``: a path relative to it, ``size``,
    ``mtime_ns``); empty when it has none. ``ConfigError`` when a file of its name is there
    and the ledger does not prove it segpipe's."""
    fs, root = storage.resolve(folder)
    path = storage.join(root, STAMPS_NAME)
    info = _lstat(fs, path)
    if info is None:
        return STAMPS_SCHEMA.empty_table()
    if info.type != pafs.FileType.File or (recorded(folder) or {}).get(STAMPS_NAME) != _stamp(info):
        raise refusal([path], folder, "read as its record of the files it wrote")
    with fs.open_input_file(path) as f:
        return pq.read_table(f, schema=STAMPS_SCHEMA)


STAMPS_SCHEMA = pa.schema([pa.field("name", pa.string()), pa.field("size", pa.int64()),
                           pa.field("mtime_ns", pa.int64())])


def write_stamps(folder: str, table: pa.Table) -> None:
    """Replace the stamps table of ``folder`` with ``table`` (``STAMPS_SCHEMA``) and enter it
    in the ledger."""
    fs, root = storage.resolve(folder)
    with storage.atomic_output(fs, storage.join(root, STAMPS_NAME)) as stream:
        pq.write_table(table.select(STAMPS_SCHEMA.names).cast(STAMPS_SCHEMA), stream)
    record_written(folder, [STAMPS_NAME])


def local_stamp(path: str) -> Optional[tuple[int, int]]:
    """``(size, mtime_ns)`` of the local file ``path``, not following a link; None when
    nothing is there, ``(-1, -1)`` for a link or anything that is not a file."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return (-1, -1)
    return (found.st_size, found.st_mtime_ns)


def _lstat(fs: pafs.FileSystem, path: str) -> Optional[pafs.FileInfo]:
    """The file info of ``path`` without following a link (a link is reported as Unknown)."""
    if _is_local(fs):
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return pafs.FileInfo(path, pafs.FileType.Unknown)
        except FileNotFoundError:
            return None
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else info


def _is_own_temporary(fs: pafs.FileSystem, path: str, names: Iterable[Union[str, re.Pattern]],
                      magic: bytes = b"") -> bool:
    found = TEMPORARY_NAME.fullmatch(posixpath.basename(path))
    if found is None or not any(_name_matches(found.group("name"), n) for n in names):
        return False
    try:
        with fs.open_input_stream(path) as stream:
            head = stream.read(len(magic) or 1)
    except FileNotFoundError:   # renamed or removed by its writer since the listing
        return False
    return not head or not magic or head == magic


def _name_matches(name: str, wanted: Union[str, re.Pattern]) -> bool:
    if isinstance(wanted, re.Pattern):
        return wanted.fullmatch(name) is not None
    return PART_NAME.fullmatch(name) is not None if wanted == "part" else name == wanted


def _writer_gone(name: str, mtime_ns: Optional[int], now: float) -> bool:
    """Whether the writer of the temporary file ``name`` is gone: its process (named in the
    file name) no longer runs on this host, or nobody touched it for ``STALE_TEMPORARY_S``."""
    found = TEMPORARY_NAME.fullmatch(name)
    if found and found.group("pid") and found.group("host") == storage.host_tag():
        try:
            os.kill(int(found.group("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass
    return mtime_ns is not None and now - mtime_ns / 1e9 >= STALE_TEMPORARY_S


def stale_temporaries(folder: str, names: Iterable[Union[str, re.Pattern]],
                      now: Optional[float] = None) -> list[str]:
    """Temporary files in ``folder`` (not below it) of the files ``names`` whose writer is
    gone (``_writer_gone``): what killed commands left behind."""
    fs, root = storage.resolve(folder)
    if not storage.is_dir(fs, root):
        return []
    now = time.time() if now is None else now
    names = list(names)
    stale = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        unlinked = _lstat(fs, info.path)   # None: gone since the listing
        if info.type != pafs.FileType.File or unlinked is None or \
                unlinked.type != pafs.FileType.File:
            continue
        if _writer_gone(info.base_name, info.mtime_ns, now) and \
                _is_own_temporary(fs, info.path, names):
            stale.append(info.path)
    return stale


def remove_recorded(folder: str, names: Iterable[str]) -> None:
    """Delete the files ``folder/name`` that the ledger lists as segpipe's, unchanged since
    (other files of those names are left alone), and drop them from the ledger."""
    fs, root = storage.resolve(folder)
    ledger = _ledger(fs, root)
    if not ledger:
        return
    files = dict(ledger[LEDGER_KEY])
    for name in names:
        info = _lstat(fs, storage.join(root, name))
        if info is not None and info.type == pafs.FileType.File and files.get(name) == _stamp(info):
            fs.delete_file(info.path)
        if info is None or files.get(name) == _stamp(info):
            files.pop(name, None)
    _write_ledger(fs, root, {**ledger, LEDGER_KEY: files})


def remove(folder: str, paths: Iterable[str]) -> None:
    """Delete ``paths`` (proven segpipe's by the functions above) under ``folder``."""
    fs, _ = storage.resolve(folder)
    for path in paths:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def prediction_entries(directory: str) -> tuple[list[str], list[str], list[str]]:
    """What ``directory`` (a run's predictions/) holds, by what segpipe can prove of it:
    (complete prediction files, temporary prediction files, everything else). Nothing is
    followed through a link; files in subfolders are never segpipe's."""
    from segpipe.schema import RUN_SETTINGS_KEY

    fs, root = storage.resolve(directory)
    complete: list[str] = []
    temporary: list[str] = []
    foreign: list[str] = []
    if _lstat(fs, root) is None:
        return complete, temporary, foreign
    for info in _entries(fs, root):
        path = info.path
        top = posixpath.dirname(path.rstrip("/")) == root.rstrip("/")
        name = posixpath.basename(path)
        if top and name == LEDGER_NAME and info.type == pafs.FileType.File:
            continue   # the folder's ledger (``_ledger`` refuses one that is not segpipe's)
        if info.type != pafs.FileType.File or not top:
            foreign.append(path)
        elif PART_NAME.fullmatch(name) and _footer_has(fs, path, RUN_SETTINGS_KEY):
            complete.append(path)
        elif _is_own_temporary(fs, path, ["part"], magic=b"PAR1"):
            temporary.append(path)
        else:
            foreign.append(path)
    return sorted(complete), sorted(temporary), sorted(foreign)


def _entries(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file (and link) under ``root``, links reported as Unknown and not followed."""
    if not _is_local(fs):
        return [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                if i.type == pafs.FileType.File]
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        for name in subfolders + names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found.append(pafs.FileInfo(path, pafs.FileType.Unknown))
            elif name in names:
                kind = pafs.FileType.File if os.path.isfile(path) else pafs.FileType.Unknown
                found.append(pafs.FileInfo(path, kind))
    return found


def _footer_has(fs: pafs.FileSystem, path: str, key: bytes) -> bool:
    try:
        with fs.open_input_file(path) as f:
            metadata = pq.read_schema(f).metadata or {}
    except Exception:   # not Parquet, or damaged: nothing proves it segpipe's
        return False
    return key in metadata


def check_clearable(directory: str) -> tuple[list[str], list[str]]:
    """segpipe's own files in a run's predictions/ (complete, temporary), which a fresh run
    removes; ``ConfigError`` naming anything else there."""
    complete, temporary, foreign = prediction_entries(directory)
    if foreign:
        raise refusal(foreign, directory, "remove")
    return complete, temporary

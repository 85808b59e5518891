"""Find the input images and give each a stable id: image files, tar shards, Parquet tables.

For image files the driver lists every input itself, so that the run knows before any work
exactly which images must come out the other end; the listing becomes the Ray Dataset the
decode tasks read. Tar shards (WebDataset style) and Parquet tables with an image column are
read by segpipe's own Ray Data stages (``read_tar_shards`` with Python's ``tarfile`` as a
stream, ``read_image_tables`` with pyarrow row group by row group), so that a damaged shard or
table costs only its own unreadable part. Their images are only known as they are read.
Names from shards and tables pass ``safe_file_name``.
``input_files`` decides what under INPUT is input at all: no symbolic links to folders, no
file twice, none of segpipe's own output folders.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from segpipe.config import ConfigError
from segpipe.io import ownership, storage
from segpipe.names import UNSAFE_CHARACTERS, UNSAFE_CHARACTERS_RE2, unsafe_character
from segpipe.schema import IMAGE_ID_BITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LISTING_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("source_error", pa.string()),   # why the file cannot be read (its row's error)
])


#: Characters percent-encoded in a file_name: ``%`` itself (so the encoding is reversible),
#: backslashes, and every character a name may not hold (``segpipe.names``:
#: controls, line separators, bidi overrides...).
_UNSAFE_CHARACTERS = re.compile(r"[%\\]|" + UNSAFE_CHARACTERS.pattern)
#: An RE2 pattern (Arrow) that finds every ``file_name`` ``safe_file_name`` never makes: a
#: leading ``/``, an empty, ``.`` or ``..`` segment, a backslash or an unsafe character.
UNSAFE_FILE_NAME_RE2 = (r"^/|(^|/)\.{0,2}(/|$)|\\|" + UNSAFE_CHARACTERS_RE2)


def _percent(character: str) -> str:
    """A character as the percent-encoded bytes of its UTF-8 (a surrogate of an undecodable
    byte as that byte)."""
    try:
        data = character.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = character.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in data)


def safe_file_name(name: str) -> str:
    """``name`` (from a tar member, a Parquet name column or a folder) as a safe relative POSIX
    path: ``%``, ``\\`` and unsafe characters (percent-encoded as UTF-8 bytes), a leading
    ``/`` and every empty, ``.`` or ``..`` segment are percent-encoded (``../../x.jpg`` →
    ``%2E%2E/%2E%2E/x.jpg``, ``/abs/x.jpg`` → ``%2Fabs/x.jpg``, a line feed → ``%0A``).
    Ordinary names are unchanged. The mapping is one to one, so distinct inputs keep distinct
    names and ids, and no consumer of ``file_name`` (render, a label list, a labeling tool)
    is led outside its folder or sees a line end."""
    encoded = _UNSAFE_CHARACTERS.sub(lambda m: _percent(m.group()), name)
    head = "%2F" if encoded.startswith("/") else ""
    segments = (encoded[1:] if head else encoded).split("/")
    special = {"": "%00", ".": "%2E", "..": "%2E%2E"}
    return head + "/".join(special.get(segment, segment) for segment in segments)


def is_safe_file_name(name: str) -> bool:
    """Whether ``name`` is a ``file_name`` segpipe writes: relative, no empty, ``.`` or
    ``..`` segment, no backslash or unsafe character (``%`` may stand anywhere)."""
    return not re.search(r"^/|(^|/)\.{0,2}(/|$)|\\", name) and \
        unsafe_character(name) is None


def folder_file_name(name: str) -> str:
    """The ``file_name`` of a folder entry (``name``, its path relative to INPUT): ``name``
    itself when it is a safe name (``50%.jpg``, ``a b/c.jpg``: what COCO's ``file_name``
    should be, the path a training loader joins to the folder), else ``safe_file_name(name)``
    (``a\\b.jpg`` → ``a%5Cb.jpg``), as also for a safe name that reads as such an encoding
    (``a%0A.jpg`` → ``a%250A.jpg``), so that ``original_file_name`` tells every encoded name
    from a name of its own."""
    if is_safe_file_name(name) and original_file_name(name) is None:
        return name
    return safe_file_name(name)


def original_file_name(file_name: str) -> Optional[str]:
    """The folder entry a ``file_name`` was encoded from by ``folder_file_name``
    (``a%5Cb.jpg`` → ``a\\b.jpg``), so that render, the YOLO links and Label Studio's URLs
    reach the file itself; None when ``file_name`` is the entry's own name (``50%.jpg``)."""
    if "%" not in file_name:
        return None
    try:
        name = urllib.parse.unquote_to_bytes(file_name).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if re.search(r"^/|(^|/)\.{0,2}(/|$)", name) or safe_file_name(name) != file_name or \
            folder_file_name(name) != file_name:   # shorter than file_name: this ends
        return None
    return name


def undecodable_name(name: str) -> str:
    """A local file name that is not valid UTF-8 (Python holds its bad bytes as surrogates) as
    text: ``%`` and the bytes that do not decode percent-encoded (``caf\\xe9.jpg`` →
    ``caf%E9.jpg``), one to one among such names."""
    return re.sub(r"[\udc80-\udcff]", lambda m: f"%{ord(m.group()) - 0xDC00:02X}",
                  name.replace("%", "%25"))


def is_undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


#: The error row of an image file whose name is not valid UTF-8.
UNDECODABLE_NAME = ("the file name is not valid UTF-8 (its undecodable bytes are shown as %XX "
                    "here); rename the file to segment it")


def image_id_for(file_name: str) -> int:
    """A stable id for ``file_name``: 53 bits of BLAKE2b of the relative path, so that it stays
    exact in every JSON tool (``schema.IMAGE_IDS``)."""
    digest = hashlib.blake2b(file_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << IMAGE_ID_BITS) - 1)


def is_image_name(name: str) -> bool:
    """True for names with an image extension, in any letter case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


SKIPPED_LINKED_FOLDERS = "symbolic links to folders (not followed)"
SKIPPED_SAME_FILE = "links to a file listed already under another name"
SKIPPED_OUTPUT_FOLDERS = "segpipe outputs (an OUTPUT, or what an export/render/review/eval --to wrote)"


SKIPPED_BROKEN_LINKS = "broken symbolic links"


SKIPPED_NOT_FILES = "entries that are not regular files (FIFOs, sockets, devices: never opened)"


SKIPPED_NOT_IMAGES = "files without an image extension"


@dataclass
class InputFiles:
    """The files of INPUT and what was left out, by reason (paths relative to ``root``)."""

    fs: pafs.FileSystem
    root: str                      # the folder (for a single-file INPUT, its folder)
    files: list[pafs.FileInfo]     # sorted by path
    skipped: dict[str, list[str]] = field(default_factory=dict)
    undecodable: list[str] = field(default_factory=list)   # local files whose names are not


def input_files(input_uri: str, exclude: Sequence[str] = ()) -> InputFiles:
    """Every file under ``input_uri``, without what is not the user's input:

    * a local INPUT is walked without following symbolic links to folders (a link to ``..``
      would loop), and a file reached twice (a link to a file listed already, a hard link) is
      listed once; links to files are followed;
    * folders segpipe wrote (holding segpipe's ledger, ``ownership.found_before`` not None:
      not any file named run.json), but for the entries they held before segpipe first wrote
      there (``found_before``: a ``--to`` given a folder above the user's images),
      and the folders in ``exclude`` (the run's own OUTPUT, when it sits inside INPUT) are
      left out.

    Raises ``ConfigError`` when INPUT does not exist."""
    fs, root = storage.resolve(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"INPUT {input_uri} does not exist")
    if info.type == pafs.FileType.File:
        return InputFiles(fs, root.rsplit("/", 1)[0], [info])
    skipped: dict[str, list[str]] = {}
    undecodable: list[str] = []
    excluded = {storage.resolve(e)[1].rstrip("/") for e in exclude
                if type(storage.resolve(e)[0]) is type(fs)}
    if isinstance(fs, pafs.LocalFileSystem):
        files = _walk_local(root, skipped, undecodable)
    else:
        files = storage.list_files(fs, root)
    prefix = root.rstrip("/") + "/"
    ledgered = {posixpath.dirname(f.path) for f in files
                if posixpath.basename(f.path) == ownership.LEDGER_NAME}
    users = {folder: found for folder in ledgered
             if (found := ownership.found_before(fs, folder)) is not None}
    excluded |= set(users)
    kept, left_out = [], set()
    for f in files:
        holder = next((place for place in map(_left_out_by(f.path, users), excluded) if place),
                      None)
        if holder is None:
            kept.append(f)
        elif posixpath.basename(holder) not in ownership.BOOKKEEPING_NAMES:
            left_out.add(holder[len(prefix):] if holder.startswith(prefix) else holder)
    if left_out:
        skipped[SKIPPED_OUTPUT_FOLDERS] = sorted(left_out)
    return InputFiles(fs, root, kept, skipped, undecodable)


def _left_out_by(path: str, users: dict[str, frozenset[str]]):
    """For a left-out folder: what leaves ``path`` out (the folder, or the entry of a
    segpipe output folder that segpipe made), or None when ``path`` is not under it or lies
    in an entry the user had there before segpipe (``users``)."""
    def holder(folder: str) -> Optional[str]:
        inside = folder.rstrip("/") + "/"
        if not path.startswith(inside):
            return None
        found = users.get(folder)
        if not found:
            return folder
        entry = path[len(inside):].split("/", 1)[0]
        return None if entry in found else inside + entry
    return holder


def _walk_local(root: str, skipped: dict[str, list[str]],
                undecodable: list[str]) -> list[pafs.FileInfo]:
    """The regular files under ``root``; what is not one is counted in ``skipped`` by reason
    (a FIFO is never opened: it could block), and files whose names are not UTF-8 go to
    ``undecodable`` (their names encoded)."""
    files: list[pafs.FileInfo] = []
    seen: dict[tuple[int, int], str] = {}

    def relative(path: str) -> str:
        name = os.path.relpath(path, root).replace(os.sep, "/")
        return undecodable_name(name) if is_undecodable(name) else name

    for folder, subfolders, names in os.walk(root, followlinks=False):
        for sub in list(subfolders):
            if os.path.islink(os.path.join(folder, sub)):
                skipped.setdefault(SKIPPED_LINKED_FOLDERS, []).append(
                    relative(os.path.join(folder, sub)))
                subfolders.remove(sub)
        subfolders.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                status = os.stat(path)           # follows a link to a file
            except OSError:                       # a broken link (or one that loops)
                skipped.setdefault(SKIPPED_BROKEN_LINKS, []).append(relative(path))
                continue
            if not stat.S_ISREG(status.st_mode):
                skipped.setdefault(SKIPPED_NOT_FILES, []).append(relative(path))
                continue
            if is_undecodable(path):
                undecodable.append(relative(path))
                continue
            key = (status.st_dev, status.st_ino)
            if key in seen:
                skipped.setdefault(SKIPPED_SAME_FILE, []).append(
                    f"{relative(path)} (= {seen[key]})")
                continue
            seen[key] = relative(path)
            files.append(pafs.FileInfo(path.replace(os.sep, "/"), pafs.FileType.File,
                                       size=status.st_size))
    return sorted(files, key=lambda f: f.path)


def list_images(input_uri: str, exclude: Sequence[str] = ()) -> pa.Table:
    """List image files under ``input_uri`` (a folder or a single file), sorted by file_name.

    Returns a table with ``LISTING_SCHEMA``. ``file_name`` is the path relative to the input
    folder with ``/`` separators. Raises ``ConfigError`` when the input does not exist, holds no
    image, or two names would share an id.
    """
    return image_listing(input_files(input_uri, exclude), input_uri)


def image_listing(found: InputFiles, input_uri: str) -> pa.Table:
    """``list_images`` of the files ``input_files`` found."""
    root, files = found.root, found.files
    rows: list[tuple[int, str, str, int, Optional[str]]] = []
    prefix = root.rstrip("/") + "/"
    for f in files:
        file_name = f.path[len(prefix):] if f.path.startswith(prefix) else f.base_name
        file_name = folder_file_name(file_name)   # a line feed, an escape... encoded
        if is_image_name(file_name):
            rows.append((image_id_for(file_name), file_name, f.path, f.size or 0, None))
        else:
            found.skipped.setdefault(SKIPPED_NOT_IMAGES, []).append(file_name)
    for file_name in found.undecodable:   # an error row each: accounted for, never read
        if is_image_name(file_name):
            rows.append((image_id_for(file_name), file_name, "", 0, UNDECODABLE_NAME))
        else:
            found.skipped.setdefault(SKIPPED_NOT_IMAGES, []).append(file_name)
    rows.sort(key=lambda row: row[1])
    if not rows:
        raise ConfigError(f"INPUT {input_uri} holds no image file "
                          f"(extensions {', '.join(IMAGE_EXTENSIONS)}, any letter case)")
    _check_unique_ids(rows)
    columns = list(zip(*rows))
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, LISTING_SCHEMA)],
                    schema=LISTING_SCHEMA)


def _check_unique_ids(rows: list[tuple]) -> None:
    seen: dict[int, str] = {}
    for image_id, file_name, *_ in rows:
        if image_id in seen:
            other = seen[image_id]
            raise ConfigError(f"image id collision between {other!r} and {file_name!r}; "
                              "rename one of them")
        seen[image_id] = file_name


def split_listing(listing: pa.Table, target_blocks: int = 64, max_rows: int = 1024) -> list[pa.Table]:
    """Cut the listing into blocks so that decode work spreads over many tasks."""
    rows = max(1, min(max_rows, math.ceil(listing.num_rows / target_blocks)))
    return [listing.slice(start, rows) for start in range(0, listing.num_rows, rows)]


#: Rows from every source into decode: ``path`` (read by decode) or ``data`` (bytes already read).
#: ``source_error``: why a reader could not give this row's bytes (decode makes it an error row).
SOURCE_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("data", pa.large_binary()),
    pa.field("source_error", pa.string()),
])


@dataclass(frozen=True)
class ReadOptions:
    """What a reader of shards or tables needs besides their paths: INPUT, its folder
    (``root``: names are relative to it) and the table columns to read."""

    input_uri: str
    root: str
    image_column: str = "image"
    name_column: Optional[str] = None


def relative_name(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]


def source_table(names: list[str], datas: list[Optional[bytes]], done: frozenset[int],
                  source_errors: Optional[list[Optional[str]]] = None) -> pa.Table:
    """Source rows; ``names`` are safe already (``safe_file_name``)."""
    source_errors = source_errors or [None] * len(names)
    rows = [(image_id_for(n), n, None, len(d or b""), d, e)
            for n, d, e in zip(names, datas, source_errors)]
    rows = [r for r in rows if r[0] not in done]
    columns: list[tuple] = list(zip(*rows)) if rows else [() for _ in SOURCE_SCHEMA]
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, SOURCE_SCHEMA)],
                    schema=SOURCE_SCHEMA)


#: In the error row of a shard or table that could not be read to its end (``report.cut_short``).
READ_CUT = "could not be read to its end"

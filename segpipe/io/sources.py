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
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

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
SKIPPED_OUTPUT_FOLDERS = "segpipe output folders (OUTPUT, or an export/render/eval --to)"


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
    * folders segpipe wrote (holding segpipe's ledger, ``ownership.is_output_folder``: not
      any file named run.json) and the folders in ``exclude``
      (the run's own OUTPUT, when it sits inside INPUT) are left out.

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
    excluded |= {posixpath.dirname(f.path) for f in files
                 if posixpath.basename(f.path) == ownership.LEDGER_NAME
                 and ownership.is_output_folder(fs, posixpath.dirname(f.path))}
    kept, left_out = [], set()
    for f in files:
        holder = next((d for d in excluded if f.path.startswith(d.rstrip("/") + "/")), None)
        if holder is None:
            kept.append(f)
        else:
            left_out.add(holder[len(prefix):] if holder.startswith(prefix) else holder)
    if left_out:
        skipped[SKIPPED_OUTPUT_FOLDERS] = sorted(left_out)
    return InputFiles(fs, root, kept, skipped, undecodable)


def _walk_local(root: str, skipped: dict[str, list[str]],
                undecodable: list[str]) -> list[pafs.FileInfo]:
    """The regular files under ``root``; what is not one is counted in ``skipped`` by reason
    (a FIFO is never opened: it could block), and files whose names are not UTF-8 go to
    ``undecodable`` (their names encoded)."""
    files, seen = [], {}

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
    rows = []
    prefix = root.rstrip("/") + "/"
    for f in files:
        file_name = f.path[len(prefix):] if f.path.startswith(prefix) else f.base_name
        if not is_safe_file_name(file_name):   # a line feed, an escape... in a local name
            file_name = safe_file_name(file_name)
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


INPUT_FORMATS = ("auto", "files", "tar", "parquet")

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


def detect_input_format(input_uri: str, found: Optional[InputFiles] = None) -> str:
    """``files``, ``tar`` or ``parquet``, from the kinds of files under ``input_uri``."""
    found = found or input_files(input_uri)
    names = [i.path for i in found.files]
    kinds = {"files" if is_image_name(n) else "tar" if n.lower().endswith(".tar")
             else "parquet" if n.lower().endswith(".parquet") else None for n in names} - {None}
    if len(kinds) > 1:
        raise ConfigError(f"INPUT {input_uri} mixes {', '.join(sorted(kinds))} inputs; choose one "
                          "with --input-format")
    if not kinds:
        raise ConfigError(f"INPUT {input_uri} holds no image file, .tar shard or .parquet table")
    return kinds.pop()


def list_tables(found: InputFiles, suffix: str, input_uri: str) -> list[str]:
    """The sorted paths of the ``suffix`` files among ``found`` (``input_uri``'s files)."""
    paths = [i.path for i in found.files if i.path.lower().endswith(suffix)]
    if not paths:
        raise ConfigError(f"INPUT {input_uri} holds no {suffix} file")
    return paths


def relative_name(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]


def _source_table(names: list[str], datas: list[Optional[bytes]], done: frozenset[int],
                  source_errors: Optional[list[Optional[str]]] = None) -> pa.Table:
    """Source rows; ``names`` are safe already (``safe_file_name``)."""
    source_errors = source_errors or [None] * len(names)
    rows = [(image_id_for(n), n, None, len(d or b""), d, e)
            for n, d, e in zip(names, datas, source_errors)]
    rows = [r for r in rows if r[0] not in done]
    columns = list(zip(*rows)) if rows else [[] for _ in SOURCE_SCHEMA]
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, SOURCE_SCHEMA)],
                    schema=SOURCE_SCHEMA)


#: In the error row of a shard or table that could not be read to its end (``report.cut_short``).
READ_CUT = "could not be read to its end"


class _TailKeepingReader:
    """A file object that remembers the last bytes read through it, so that after Python's
    ``tarfile`` stops, the end-of-archive marker (two zero blocks) can be checked: ``tarfile``
    ends silently at a file cut between or inside headers."""

    KEEP = 1 << 16

    def __init__(self, stream):
        self.stream, self.consumed, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.consumed += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def has_end_marker(self, offset: int) -> bool:
        """True when two zero blocks follow the last member (which ends at ``offset``).
        ``tarfile`` reads in records of 10,240 bytes and stops at the first zero block: when
        that block ends a record, the second is not read yet, so it is read here."""
        missing = offset + 1024 - self.consumed
        if missing > 0:
            self.read(missing)
        start = offset - (self.consumed - len(self.tail))
        return 0 <= start and len(self.tail) >= start + 1024 and \
            not any(self.tail[start:start + 1024])


def tar_images(fs: pafs.FileSystem, path: str,
               shard: str) -> Iterator[tuple[Optional[str], Optional[bytes]]]:
    """Stream the tar shard at ``path`` (named ``shard`` in file names): ``(name, bytes)`` for
    each image member, ``(None, None)`` for each other file member; raises where the shard is
    damaged (``tarfile.TarError``, ``OSError``...), after what came before it."""
    import tarfile

    with fs.open_input_stream(path) as raw:
        reader = _TailKeepingReader(raw)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if not is_image_name(member.name):
                    yield None, None
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield f"{shard}/{safe_file_name(member.name)}", data
            if not reader.has_end_marker(tar.offset):
                raise tarfile.ReadError("no end-of-archive marker: the file ends early")


def read_tar_shards(batch: pa.Table, input_uri: str, root: str, done: frozenset[int],
                    monitor: Optional[object] = None) -> pa.Table:
    """Ray Data stage: each row names a tar shard (``path``); read it with Python's ``tarfile``
    as a stream (``tar_images``) and return one row per image member, named
    ``<shard>/<member>``.

    A shard that cannot be read to its end (truncated in a member or a header, cut at a member
    boundary without the end-of-archive marker, not a tar at all) keeps the rows of every
    member read before the damage and adds one error row named after the shard, saying where
    it stopped; other shards are not affected. Members without an image extension (captions,
    JSON, class files) are counted, through ``monitor``, as skipped.
    """
    import tarfile

    fs, _ = storage.resolve(input_uri)
    names: list[str] = []
    datas: list[Optional[bytes]] = []
    errors: list[Optional[str]] = []
    skipped = 0
    for path in batch.column("path").to_pylist():
        shard = safe_file_name(relative_name(path, root))
        members = 0
        try:
            for name, data in tar_images(fs, path, shard):
                members += 1
                if name is None:
                    skipped += 1
                    continue
                names.append(name)
                datas.append(data)
                errors.append(None)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            names.append(shard)
            datas.append(None)
            errors.append(f"shard {READ_CUT}: {str(exc) or type(exc).__name__} (after {members} "
                          "members; the members after that are not in the run)")
    if monitor is not None and skipped:
        monitor.add_skipped.remote("tar members without an image extension", skipped)
    return _source_table(names, datas, done, errors)


def image_bytes(value: object) -> bytes:
    """The encoded image in an image-column value: bytes, or a Hugging Face ``Image`` struct
    (``{"bytes": ..., "path": ...}``); ``ValueError`` for anything else (a number, a text)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"the image column holds a {type(value).__name__}, not image bytes")


def table_images(fs: pafs.FileSystem, path: str, table: str, image_column: str,
                 name_column: Optional[str]
                 ) -> Iterator[tuple[str, Optional[bytes], Optional[str]]]:
    """Read the Parquet table at ``path`` (named ``table`` in file names) row group by row
    group: ``(name, bytes, None)`` per row, or ``(name, None, reason)`` for a value that is not
    image bytes. The name is ``name_column``'s value, or ``<table>#<BLAKE2b of the bytes>``.
    Raises where the table cannot be read (``OSError``, ``pa.ArrowException``, ``ValueError``
    for a missing column), after the rows that came before."""
    import pyarrow.parquet as pq

    columns = [image_column] + ([name_column] if name_column else [])
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"no column {', '.join(map(repr, missing))}")
        rows = 0
        for group in range(parquet.num_row_groups):
            part = parquet.read_row_group(group, columns=columns)
            given = (part.column(name_column).to_pylist() if name_column
                     else [None] * part.num_rows)
            for value, name in zip(part.column(image_column).to_pylist(), given):
                try:
                    data, error = image_bytes(value), None
                except ValueError as exc:
                    data, error = None, str(exc)
                if name is not None:
                    name = safe_file_name(str(name))
                elif data is not None:
                    name = f"{table}#{hashlib.blake2b(data, digest_size=8).hexdigest()}"
                else:
                    name = f"{table}#row{rows}"
                rows += 1
                yield name, data, error


def read_image_tables(batch: pa.Table, input_uri: str, root: str, image_column: str,
                      name_column: Optional[str], done: frozenset[int]) -> pa.Table:
    """Ray Data stage: each row names a Parquet table (``path``); return one row per table
    row (``table_images``).

    A value of the image column that is not image bytes becomes that row's error. A table that
    cannot be read to its end (not Parquet, corrupt, without the named columns) keeps the rows
    of the row groups read before and adds one error row named after the table; other tables
    are not affected.
    """
    fs, _ = storage.resolve(input_uri)
    names: list[str] = []
    datas: list[Optional[bytes]] = []
    errors: list[Optional[str]] = []
    for path in batch.column("path").to_pylist():
        table = safe_file_name(relative_name(path, root))
        rows = 0
        try:
            for name, data, error in table_images(fs, path, table, image_column, name_column):
                names.append(name)
                datas.append(data)
                errors.append(error)
                rows += 1
        except (OSError, pa.ArrowException, ValueError) as exc:
            names.append(table)
            datas.append(None)
            errors.append(f"table {READ_CUT}: {exc} (after {rows} rows; the rows after that "
                          "are not in the run)")
    return _source_table(names, datas, done, errors)


@dataclass
class InputListing:
    """What ``list_inputs`` found: the format, the images (files inputs) and what was left out."""

    input_format: str
    listing: Optional[pa.Table]            # files inputs: every image
    skipped: dict[str, list[str]]
    root: str = ""                         # INPUT's folder
    tables: list[str] = field(default_factory=list)   # tar and parquet inputs: their paths


def list_inputs(input_uri: str, input_format: str, image_column: str = "image",
                name_column: Optional[str] = None, exclude: Sequence[str] = ()) -> InputListing:
    """The input format (``auto`` resolved) and, for image files, the listing of every image.

    Shards and tables are checked to exist (and tables to have the named columns); their
    images are only known as they are read, so they have no listing. ``exclude``: folders
    to leave out (the run's OUTPUT); see ``input_files``.
    """
    found = input_files(input_uri, exclude)
    if input_format == "auto":
        input_format = detect_input_format(input_uri, found)
    if input_format == "files":
        return InputListing(input_format, image_listing(found, input_uri), found.skipped,
                            found.root)
    paths = list_tables(found, ".tar" if input_format == "tar" else ".parquet", input_uri)
    if input_format == "parquet":
        check_parquet_columns(paths, input_uri, image_column, name_column)
    return InputListing(input_format, None, found.skipped, found.root, paths)


def check_parquet_columns(paths: list[str], input_uri: str, image_column: str,
                          name_column: str | None) -> None:
    """Fail before any work when the tables lack the named columns."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(input_uri)
    with fs.open_input_file(paths[0]) as f:
        names = pq.read_schema(f).names
    for flag, column in (("--image-column", image_column), ("--name-column", name_column)):
        if column and column not in names:
            raise ConfigError(f"{flag} {column!r} is not a column of {paths[0]} "
                              f"(columns: {', '.join(names)})")

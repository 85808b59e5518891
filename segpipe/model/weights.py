"""Where a run's weights come from, and fetching them into torch's cache, without importing torch.

``--weights`` takes:

* ``pretrained``: torchvision's COCO checkpoint for ``--arch``, read from torch's hub cache
  (``$TORCH_HOME/hub/checkpoints/``; ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``, that
  is ``~/.cache/torch``) and downloaded there when missing, as torchvision's weights API does;
* an ``http(s)://`` URL of a checkpoint: cached and checked the same way;
* ``PATH``: a checkpoint file;
* ``random``: seeded random weights (smoke tests only).

Downloads create the cache folder, write to a temporary file, time out when the server stops
sending, show progress, and check the sha256 prefix that torchvision puts in its file names
(``...-bf2d0c1e.pth``), as ``torch.hub.load_state_dict_from_url(check_hash=True)`` does. A file
is renamed into the cache only when complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from segpipe.config import ConfigError
from segpipe.progress import Progress

#: What a run made with ``--weights random`` says, and every output of it, to whoever reads it.
RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: this run used seeded random-initialised weights; its "
                       "detections are meaningless and only exercise the pipeline")

#: torchvision's COCO weights per architecture: (weights enum member, URL). Checked against
#: torchvision's own enums by tests/test_weights.py.
PRETRAINED: dict[str, tuple[str, str]] = {
    "maskrcnn_resnet50_fpn": (
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    "maskrcnn_resnet50_fpn_v2": (
        "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"),
    "fasterrcnn_resnet50_fpn": (
        "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
        "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    "fasterrcnn_resnet50_fpn_v2": (
        "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
        "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
        "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"),
}

#: Seconds a download may wait for the server (to connect, or for the next bytes).
DOWNLOAD_TIMEOUT_S = 60.0

#: torch.hub's rule: the hex digits after the last-but-extension ``-`` are a sha256 prefix.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


class WeightsError(ConfigError):
    """Weights that cannot be found, fetched or read; the message says what to do."""


def torch_home() -> Path:
    """``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch`` (torch.hub's rule)."""
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default)))


def checkpoints_dir() -> Path:
    """torch's cache folder for downloaded checkpoints: ``torch_home()/hub/checkpoints``."""
    return torch_home() / "hub" / "checkpoints"


def describe_cache_folder() -> str:
    """Which folder the cache is, and why: for messages that tell users where to put a file."""
    if os.getenv("TORCH_HOME"):
        why = f"$TORCH_HOME/hub/checkpoints, TORCH_HOME={os.environ['TORCH_HOME']}"
    elif os.getenv("XDG_CACHE_HOME"):
        why = "$XDG_CACHE_HOME/torch/hub/checkpoints; set TORCH_HOME to use another folder"
    else:
        why = "TORCH_HOME is unset, so ~/.cache/torch/hub/checkpoints; set TORCH_HOME to change it"
    return f"{checkpoints_dir()}/ ({why})"


#: The folder of torch's cache that holds checkpoints of URLs given with ``--weights``.
URL_CACHE = "segpipe-urls"


def cached_path(url: str) -> Path:
    """Where torch's cache keeps the file downloaded from ``url``: torchvision's pretrained
    files under their own names, as torchvision keeps them; any other URL in a folder of its
    own, named by a hash of the whole URL (its secrets left out, so that a signed URL
    signed anew finds its file), so that ``a/model.pth`` and ``b/model.pth`` never share a
    file."""
    from segpipe.io.storage import redact

    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise WeightsError(f"weights URL {redact(url)} does not end in a file name")
    if url in {u for _, u in PRETRAINED.values()}:
        return checkpoints_dir() / name
    key = hashlib.sha256(redact(url).encode()).hexdigest()[:24]
    return checkpoints_dir() / URL_CACHE / key / name


def recorded_sha256(path: Path) -> Optional[str]:
    """The sha256 a download recorded beside ``path`` (None when there is no record)."""
    try:
        return path.with_name(path.name + SHA256_SUFFIX).read_text().split()[0]
    except (OSError, IndexError):
        return None


#: The record of a downloaded file's sha256 beside it.
SHA256_SUFFIX = ".sha256"


def hash_prefix(file_name: str) -> Optional[str]:
    """The sha256 prefix a file name promises (``x_coco-bf2d0c1e.pth`` → ``bf2d0c1e``), if any."""
    found = _HASH_IN_NAME.search(os.path.basename(file_name))
    return found.group(1) if found else None


def check_hash(path: Path, sha256: str) -> None:
    """Raise ``WeightsError`` when ``path``'s bytes are not what is known of them: the sha256
    its download recorded, or the sha256 prefix its name promises."""
    recorded = recorded_sha256(path)
    if recorded is not None and recorded != sha256:
        raise WeightsError(f"{path} changed since it was downloaded: its sha256 is "
                           f"{sha256[:16]}..., the download recorded {recorded[:16]}...; "
                           "delete it and run again to download it afresh")
    prefix = hash_prefix(path.name)
    if prefix and not sha256.startswith(prefix):
        raise WeightsError(f"{path} is corrupt or not the file its name promises: its sha256 "
                           f"begins {sha256[:len(prefix)]}, the name says {prefix}; delete it "
                           "and run again to download it afresh")


def pretrained_file(arch: str) -> Path:
    """Where torch's cache keeps the pretrained file for ``arch``."""
    return cached_path(PRETRAINED[arch][1])


@dataclass(frozen=True)
class WeightsSource:
    """What ``--weights`` names, resolved to a file (to download first when ``url`` is set)."""

    kind: str                   # "pretrained" | "url" | "file" | "folder" | "random"
    name: str                   # weights enum member, URL, path, or "random(seed=N)"
    path: Optional[Path] = None  # the checkpoint file (None for random)
    url: Optional[str] = None    # where to download ``path`` from when it is missing

    @property
    def missing(self) -> bool:
        return self.path is not None and not self.path.is_file()


def weights_source(weights: str, arch: str, seed: int = 0) -> WeightsSource:
    """Resolve the ``--weights`` setting; ``WeightsError`` when a named file does not exist."""
    if weights == "pretrained":
        if arch not in PRETRAINED:
            raise WeightsError(f"--arch {arch} has no pretrained weights segpipe fetches: pass "
                               "--weights PATH (or an http(s) URL) of its checkpoint")
        member, url = PRETRAINED[arch]
        return WeightsSource("pretrained", member, cached_path(url), url)
    if weights == "random":
        return WeightsSource("random", f"random(seed={seed})")
    if weights.startswith(("http://", "https://")):
        return WeightsSource("url", weights, cached_path(weights), weights)
    if "://" in weights:
        raise WeightsError(f"--weights {weights}: only local files and http(s) URLs can be "
                           "loaded; copy the checkpoint to a local path first")
    path = Path(weights).expanduser()
    if path.is_dir() and _takes_folders(arch):
        return WeightsSource("folder", str(path), path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise WeightsError(f"weights file {weights} {what} (--weights takes pretrained, random, "
                           "an http(s) URL, or the path of a state_dict checkpoint)")
    return WeightsSource("file", str(path), path)


def _takes_folders(arch: str) -> bool:
    from segpipe.model.families import family_of

    try:
        return family_of(arch).weights_folder
    except ConfigError:
        return False


def fetch(source: WeightsSource, timeout: float = DOWNLOAD_TIMEOUT_S,
          show_progress: bool = True) -> None:
    """Download ``source`` into torch's cache when it is missing there."""
    if source.url is None or source.path is None or not source.missing:
        return
    try:
        download_checkpoint(source.url, source.path, timeout=timeout, show_progress=show_progress)
    except WeightsError as exc:
        what = (f"pretrained weights {source.name}" if source.kind == "pretrained"
                else f"weights {source.url}")
        raise WeightsError(
            f"{what} are not in torch's cache and could not be downloaded: {exc}. Put the "
            f"file {source.path.name} (from {source.url}) into {describe_cache_folder()}, or "
            "pass --weights PATH to a checkpoint file") from None


def download_checkpoint(url: str, path: Path, timeout: float = DOWNLOAD_TIMEOUT_S,
                        show_progress: bool = True) -> None:
    """Download ``url`` to ``path``: folder created, temporary file, timeout, progress, and the
    sha256 prefix in the file name checked. Raises ``WeightsError`` naming the cause."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the cache folder {path.parent}: "
                           f"{exc.strerror or exc}") from None
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    digest = hashlib.sha256()
    written = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "segpipe"})
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with Progress(f"downloading {path.name}", total, unit="B",
                          enabled=show_progress, interval=10.0) as progress:
                while chunk := response.read1(1 << 20):  # what has arrived, up to 1 MB
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    progress.update(written)
        if total is not None and written != total:
            raise WeightsError(f"the download ended after {written} of {total} bytes")
        prefix = hash_prefix(path.name)
        if prefix and not digest.hexdigest().startswith(prefix):
            raise WeightsError(f"the downloaded file's sha256 begins "
                               f"{digest.hexdigest()[:len(prefix)]}, but its name promises "
                               f"{prefix}: it is not that file (or it was corrupted on the way) "
                               "and was deleted")
        os.replace(partial, path)
        path.with_name(path.name + SHA256_SUFFIX).write_text(f"{digest.hexdigest()}\n")
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise WeightsError(f"cannot reach {urllib.parse.urlparse(url).netloc} "
                           f"({_reason(exc.reason)})") from None
    except http.client.HTTPException as exc:  # IncompleteRead: the connection closed early
        raise WeightsError(f"the download from {urllib.parse.urlparse(url).netloc} broke off "
                           f"after {written} bytes ({type(exc).__name__})") from None
    except (socket.timeout, TimeoutError):
        raise WeightsError(f"{urllib.parse.urlparse(url).netloc} sent nothing for {timeout:g} s "
                           f"(after {written} bytes)") from None
    except OSError as exc:
        raise WeightsError(f"cannot write {partial}: {exc.strerror or exc}") from None
    finally:
        if partial.exists():
            partial.unlink()


def _reason(reason) -> str:
    if isinstance(reason, BaseException):
        return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return str(reason)

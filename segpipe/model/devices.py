"""Which device a predictor runs on: CUDA facts, device choice, and what makes an actor give up."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch


class DeviceError(RuntimeError):
    """A GPU was asked for and cannot be used; the message holds the facts to fix it."""

log = logging.getLogger(__name__)


def cuda_facts() -> dict[str, Any]:
    """What decides whether torch can use a GPU here: torch's CUDA build, the driver, the
    devices Ray (or the user) made visible."""
    driver = Path("/proc/driver/nvidia/version")
    facts: dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "driver": (driver.read_text().splitlines()[0].strip() if driver.exists()
                   else "no NVIDIA driver loaded (/proc/driver/nvidia/version is missing)"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts["cuda_available"] = torch.cuda.is_available()
        facts["device_count"] = torch.cuda.device_count() if facts["cuda_available"] else 0
    facts["torch_says"] = "; ".join(str(w.message).strip() for w in caught) or None
    return facts


def select_device(use_gpu: bool) -> torch.device:
    """``cuda`` when a GPU was asked for, ``cpu`` otherwise; a GPU asked for that torch cannot
    use is an error (``DeviceError``), never a silent 100× slower run on the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    facts = cuda_facts()
    if not facts["cuda_available"]:
        raise DeviceError(
            "this predictor was given a GPU but torch cannot use it: "
            + ", ".join(f"{key}={value}" for key, value in facts.items() if value is not None)
            + ". Install a torch build whose CUDA the driver supports (`nvidia-smi` shows the "
              "driver's CUDA version), or run with --num-gpus 0")
    return torch.device("cuda")


def describe_device(device: torch.device, precision: str) -> dict[str, Any]:
    """The device a predictor actually runs on, for run.json."""
    described: dict[str, Any] = {"device": device.type, "precision": precision,
                                 "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        described.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                         capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        described.update(threads=torch.get_num_threads())
    return described


def actor_identity() -> dict[str, str]:
    """This Ray actor's id and its node's, for the run's record of where predictors ran."""
    import ray

    context = ray.get_runtime_context()
    return {"actor": context.get_actor_id() or "", "node": context.get_node_id()}


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error after which the context is unusable (illegal address, device-side assert,
    launch failure): only a new process recovers. Out-of-memory is not one of them."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "CUBLAS_STATUS" in text
                                              or "CUDNN_STATUS" in text)


def end_actor(reason: str) -> None:
    """End this actor's process so Ray restarts it (and retries its batch) with a new CUDA
    context; every later image would fail in this one."""
    log.error("predictor %d ends its process: %s", os.getpid(), reason)
    os._exit(70)

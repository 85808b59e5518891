"""``decode: predictor`` on a device: its pixels against Pillow's, and its speed; runs on CPU too.

    python bench/gpu_decode.py FOLDER [--device cuda] [--images 64] [--batch 16] [--json PATH]

Needs torch, torchvision, numpy and Pillow only (what a bare GPU machine has). Reads the first
``--images`` JPEGs of FOLDER and writes one JSON (``--json``, and stdout) with:

* ``pixels``: segpipe's device decoder (``model.jpeg.decode_jpegs``: nvJPEG on CUDA,
  libjpeg-turbo on CPU) against its CPU decoder (``io.decode.decode_image``, Pillow): the largest
  difference of a channel value, the mean absolute difference, and the share of values that
  differ, over every image;
* ``images_per_s``: both decoders, JPEG bytes in memory to pixels on the device (Pillow's
  uploaded, as the predictor uploads decoded pixels), batches of ``--batch``, after one
  untimed batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import report_json  # noqa: E402
from segpipe.io.decode import DecodeLimits, decode_image  # noqa: E402
from segpipe.model.jpeg import decode_jpegs  # noqa: E402

LIMITS = DecodeLimits(max_pixels=1 << 30, max_bytes=1 << 30)


def pixel_agreement(files: list[bytes], device: torch.device) -> dict:
    worst, total, differing, values = 0, 0, 0, 0
    for data in files:
        want = decode_image(data, LIMITS)
        got = decode_jpegs([data], [want.shape[:2]], device)[0]
        if isinstance(got, str):
            raise SystemExit(f"the device decoder refused a JPEG Pillow decodes: {got}")
        diff = np.abs(got.cpu().numpy().astype(np.int16) - want.astype(np.int16))
        worst = max(worst, int(diff.max()))
        total += int(diff.sum())
        differing += int(np.count_nonzero(diff))
        values += diff.size
    return {"max_abs_diff": worst, "mean_abs_diff": round(total / values, 5),
            "share_differing": round(differing / values, 5), "images": len(files)}


def speed(files: list[bytes], device: torch.device, batch: int) -> dict:
    sizes = [decode_image(data, LIMITS).shape[:2] for data in files]

    def device_decoder(start: int) -> None:
        decode_jpegs(files[start:start + batch], sizes[start:start + batch], device)

    def pillow_then_upload(start: int) -> None:
        for data in files[start:start + batch]:
            torch.from_numpy(decode_image(data, LIMITS)).to(device)

    out = {}
    for name, decode in (("device_decoder", device_decoder), ("pillow_then_upload",
                                                              pillow_then_upload)):
        decode(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for k in range(0, len(files), batch):
            decode(k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = round(len(files) / (time.perf_counter() - start), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    files = [p.read_bytes() for p in paths[:args.images]]
    if not files:
        raise SystemExit(f"no JPEG in {args.folder}")
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "batch": args.batch,
              "pixels": pixel_agreement(files, device),
              "images_per_s": speed(files, device, args.batch)}
    report_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

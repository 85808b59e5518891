"""How to store soft masks for re-export: bytes per detection against how far a re-binarised
mask can drift from a fresh run's.

    python bench/soft_mask_storage.py [--thresholds 0.3,0.7] [--no-record]

``segpipe export --mask-threshold X`` re-pastes each stored soft mask; a fresh ``segment
--mask-threshold X`` pastes the float32 probabilities the model gave. For each way of storing
them (uint8, uint16, float16, float32) this pastes both at each threshold, on three sets of
detections on 1200×800 images, and reports the worst mask IoU, how many masks are not pixel
for pixel the same, and the bytes per detection raw and in a zstd Parquet column:

* blob masks of all sizes (box sides 16-500 px), shaped like a trained mask head's output
  (``tests/synthetic.blob_detections``);
* small blob masks (4-32 px), where one flipped pixel costs the most IoU;
* noise masks (4-60 px), what random weights give: every pixel near some threshold.

The choice it informed is ``schema.SOFT_MASK_DTYPE``. Appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from segpipe.encode.encoder import dequantise_soft_masks, encode_masks, quantise_soft_masks
from synthetic import blob_detections  # noqa: E402

H, W = 800, 1200
FORMATS = ("uint8", "uint16", "float16", "float32")


def stored(soft: np.ndarray, kind: str) -> list[bytes]:
    """Each mask as ``kind`` stores it (the integer kinds through segpipe's own quantiser)."""
    if kind in ("uint8", "uint16"):
        return [q.tobytes() for q in quantise_soft_masks(soft, kind)]
    return [m.astype(kind).tobytes() for m in soft]


def restored(blobs: list[bytes], kind: str, m: int) -> np.ndarray:
    if kind in ("uint8", "uint16"):
        return dequantise_soft_masks(blobs, kind)
    return np.frombuffer(b"".join(blobs), kind).astype(np.float32).reshape(-1, m, m)


def zstd_bytes(blobs: list[bytes]) -> float:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"soft_mask": pa.array(blobs, pa.binary())}), buffer,
                   compression="zstd")
    return buffer.tell() / len(blobs)


def detection_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sets = {}
    for name, (smallest, largest, count) in {"blobs 16-500 px": (16, 500, 4000),
                                             "blobs 4-32 px": (4, 32, 6000)}.items():
        parts = [blob_detections(100, H, W, seed=1000 + s, smallest=smallest, largest=largest)
                 for s in range(count // 100)]
        sets[name] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    rng = np.random.default_rng(5)
    x1, y1 = rng.uniform(0, W - 60, 2000), rng.uniform(0, H - 60, 2000)
    boxes = np.stack([x1, y1, x1 + rng.uniform(4, 60, 2000), y1 + rng.uniform(4, 60, 2000)], 1)
    sets["noise 4-60 px"] = (rng.random((2000, 28, 28)).astype(np.float32),
                             boxes.astype(np.float32))
    return sets


def compare(reference: list[dict], ref_areas, got: list[dict], got_areas) -> tuple[float, int]:
    ious = [1.0 if not (a or b) else float(mask_utils.iou([g], [r], [0])[0, 0])
            for r, a, g, b in zip(reference, ref_areas, got, got_areas)]
    differ = sum(g["counts"] != r["counts"] for g, r in zip(got, reference))
    return min(ious), differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", default="0.3,0.7")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = ["| detections | threshold | stored as | worst IoU | not pixel-identical | bytes raw "
            "| bytes zstd |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, (soft, boxes) in detection_sets().items():
        for threshold in (float(t) for t in args.thresholds.split(",")):
            reference, ref_areas = encode_masks(soft, boxes, H, W, threshold)
            for kind in FORMATS:
                blobs = stored(soft, kind)
                got, got_areas = encode_masks(restored(blobs, kind, soft.shape[-1]), boxes, H, W,
                                              threshold)
                worst, differ = compare(reference, ref_areas, got, got_areas)
                rows.append(f"| {name} | {threshold} | {kind} | {worst:.4f} | {differ}/{len(got)}"
                            f" | {len(blobs[0])} | {zstd_bytes(blobs):.0f} |")
                print(rows[-1], flush=True)
    if not args.no_record:
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write(f"\n## {dt.date.today().isoformat()} — soft-mask storage for re-export\n\n"
                    f"`python bench/soft_mask_storage.py {' '.join(sys.argv[1:])}`: masks pasted "
                    "from the stored soft masks against the float32 ones, 1200×800 images\n\n"
                    + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

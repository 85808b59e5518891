"""SAHI's sliced prediction and segpipe's tiled prediction of one image with the same weights,
and how far they agree (``tests/test_tiles.py`` at CI size, ``bench/tiled.py`` at full size).

segpipe's side is the predictor actor class and the encode stage, called in this process
exactly as Ray Data calls them. SAHI's side is ``get_sliced_prediction`` with its torchvision
wrapper, asked for segpipe's settings: square slices of the tile size, the same overlap
ratio, greedy NMM by IOS at the same threshold, class-aware, the model's score floor as its
confidence threshold (``force_postprocess_type``: SAHI would switch to NMS below 0.1), and
``image_size`` set to the tile so that its slices, like segpipe's tiles, are not resized.

Where the two differ by design (README "Huge images"):

* SAHI replaces a mask model's box by the bounding box of the mask's polygon (and decides
  its merges on those boxes); segpipe keeps the model's box, as torchvision and COCO results
  do. Boxes are compared both ways: SAHI's against the bounding box of segpipe's mask
  (the same definition), and SAHI's against segpipe's model box;
* SAHI stores masks as polygons traced from each slice's mask (holes filled, as COCO
  polygons lose them); segpipe keeps exact RLE. Masks are compared by IoU of the
  rasterised polygons against segpipe's RLE;
* SAHI cannot hold a detection whose mask has no polygon (empty, or under 3 contour
  points): its ``ObjectPrediction`` raises "Invalid segmentation mask" and the whole call
  fails. The reference drops such detections before SAHI sees them (``PolygonSafeModel``);
  segpipe keeps them in predictions/ with their area (0 for empty masks, which export
  leaves out of coco/), so the comparison leaves out segpipe's detections without a polygon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
from pycocotools import mask as mask_utils

from segpipe import schema
from segpipe.io.decode import pixel_column
from segpipe.encode.encoder import encode_batch
from segpipe.model.build import ModelSpec, build_model
from segpipe.model.stage import PredictStage
from segpipe.model.spec import TileSettings


@dataclass
class Found:
    """One detection in full-image pixels: ``box`` x1 y1 x2 y2 (pixel extents), ``mask`` an
    RLE (or None)."""

    label: int
    score: float
    box: np.ndarray
    mask: Optional[dict]
    mask_box: Optional[np.ndarray] = None   # bounding box of the mask, pixel extents


def decoded_rows(images: list[np.ndarray]) -> pa.Table:
    """Decode-stage rows (all ok) of ``H×W×3`` uint8 images, as the predictor receives them."""
    n = len(images)
    return pa.table({"image_id": pa.array(range(1, n + 1), pa.int64()),
                     "file_name": [f"image{k}.png" for k in range(1, n + 1)],
                     "width": pa.array([a.shape[1] for a in images], pa.int32()),
                     "height": pa.array([a.shape[0] for a in images], pa.int32()),
                     "status": ["ok"] * n, "error": pa.array([None] * n, pa.string()),
                     schema.PIXELS: pixel_column([np.ascontiguousarray(a) for a in images])})


def segpipe_tiled(spec: ModelSpec, state_dict: dict, image: np.ndarray,
                  tiling: Optional[TileSettings], batch_size: int = 4,
                  mask_threshold: float = 0.5) -> list[Found]:
    """segpipe's tiled detections of ``image`` (``H×W×3`` uint8); ``tiling`` None: the
    image predicted whole."""
    predictor = PredictStage(spec, state_dict, use_gpu=False, tiling=tiling,
                                  chunk=batch_size)
    encoded = encode_batch(predictor(decoded_rows([image])), mask_threshold)
    assert encoded.column("status").to_pylist() == ["ok"], encoded.column("error").to_pylist()
    found = []
    for det in encoded.column("detections").to_pylist()[0]:
        rle = det["segmentation"]
        mask = None if rle is None else {"size": rle["size"], "counts": rle["counts"].encode()}
        found.append(Found(det["category_id"], det["score"], np.asarray(det["box"], np.float64),
                           mask, _rle_box(mask)))
    return found


def segpipe_as_sahi_holds_it(spec: ModelSpec, state_dict: dict, image: np.ndarray,
                             tiling: TileSettings, batch_size: int = 4) -> list[Found]:
    """segpipe's tile detections, put the way SAHI holds detections before merging them:
    each mask traced to polygons as SAHI traces it, a detection without a polygon dropped,
    its box replaced by its polygons' bounding box; then segpipe's greedy merge (no seam
    joins) on those boxes. What this leaves different from ``sahi_sliced`` is not explained
    by how SAHI holds detections."""
    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    from segpipe.encode.encoder import encode_masks
    from segpipe.model.tiles import greedy_merge, image_views

    height, width = image.shape[:2]
    predictor = PredictStage(spec, state_dict, use_gpu=False)
    views = image_views(height, width, tiling)
    crops = [(image[v.window[1]:v.window[3], v.window[0]:v.window[2]], v.resize) for v in views]
    results = [r for start in range(0, len(crops), batch_size)
               for r in predictor._predict_isolated(crops[start:start + batch_size])]
    labels, scores, boxes, polygons = [], [], [], []
    for view, result in zip(views, results):
        x0, y0, x1, y1 = view.window
        rles, _ = encode_masks(result.soft_masks, result.boxes, y1 - y0, x1 - x0, 0.5)
        for k, rle in enumerate(rles):
            rle = {"size": rle["size"], "counts": rle["counts"].encode()}
            found = get_coco_segmentation_from_bool_mask(mask_utils.decode(rle))
            if not found:
                continue
            shifted = [[v + (x0 if i % 2 == 0 else y0) for i, v in enumerate(p)] for p in found]
            xs = np.concatenate([np.asarray(p[0::2]) for p in shifted])
            ys = np.concatenate([np.asarray(p[1::2]) for p in shifted])
            labels.append(int(result.labels[k]))
            scores.append(float(result.scores[k]))
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            polygons.append(shifted)
    boxes_array = np.asarray(boxes, np.float64).reshape(-1, 4)
    groups = greedy_merge(boxes_array, np.asarray(scores, np.float32),
                          np.asarray(labels, np.int32), tiling.merge_threshold)
    merged = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        parts = np.flatnonzero(groups == g)
        best = parts[np.argmax(np.asarray(scores)[parts])]
        box = np.concatenate([boxes_array[parts, :2].min(0), boxes_array[parts, 2:].max(0)])
        box[2:] += 1   # pixel extents, as sahi_sliced reports SAHI's boxes
        mask = mask_utils.merge([mask_utils.merge(mask_utils.frPyObjects(polygons[k], height,
                                                                         width))
                                 for k in parts])
        merged.append(Found(labels[best], scores[best], box, mask, box))
    return merged


def box_mask_head(state_dict: dict) -> dict:
    """``state_dict`` with a mask head that predicts its whole box (logits 4 everywhere):
    well-formed masks, as a trained head gives for compact objects, instead of the pixel
    noise of random weights, which SAHI cannot turn into polygons for most small boxes."""
    state = dict(state_dict)
    weight = "roi_heads.mask_predictor.mask_fcn_logits.weight"
    state[weight] = torch.zeros_like(state[weight])
    state[weight.replace("weight", "bias")] = torch.full_like(state[weight.replace("weight",
                                                                                  "bias")], 4.0)
    return state


def has_polygon(found: Found) -> bool:
    """Whether SAHI could hold this detection: no mask, or a mask with a polygon."""
    if found.mask is None:
        return True
    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    binary = mask_utils.decode(found.mask)
    x1, y1, x2, y2 = found.mask_box.astype(int)
    return bool(get_coco_segmentation_from_bool_mask(binary[y1:y2, x1:x2]))


def sahi_sliced(spec: ModelSpec, state_dict: dict, image: np.ndarray, tiling: TileSettings,
                overlap_ratio: float, masks: bool = True) -> list[Found]:
    """SAHI 0.12's sliced prediction of ``image`` with segpipe's settings (module doc).
    ``masks=False`` withholds a mask model's masks from SAHI, so that it keeps (and merges
    on) the model's boxes, as segpipe does."""
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    class PolygonSafeModel(TorchVisionDetectionModel):
        """SAHI's torchvision wrapper without the detections it cannot represent."""

        def _create_object_prediction_list_from_original_predictions(self, *args, **kwargs):
            for prediction in self._original_predictions:
                if not masks:
                    prediction.pop("masks", None)
                if "masks" not in prediction:
                    continue
                binary = (prediction["masks"] > self.mask_threshold).numpy()
                keep = [k for k in range(len(binary))
                        if get_coco_segmentation_from_bool_mask(binary[k])]
                for key in list(prediction):
                    prediction[key] = prediction[key][keep]
            return super()._create_object_prediction_list_from_original_predictions(*args,
                                                                                    **kwargs)

    height, width = image.shape[:2]
    model = build_model(spec)
    model.load_state_dict(state_dict)
    detector = PolygonSafeModel(
        model=model, device="cpu", confidence_threshold=spec.score_floor,
        image_size=tiling.size,
        category_mapping={str(k): str(k) for k in range(spec.num_classes)})
    result = get_sliced_prediction(
        np.ascontiguousarray(image), detector, slice_height=tiling.size, slice_width=tiling.size,
        overlap_height_ratio=overlap_ratio, overlap_width_ratio=overlap_ratio,
        perform_standard_pred=tiling.full_pass, postprocess_type="GREEDYNMM",
        postprocess_match_metric="IOS", postprocess_match_threshold=tiling.merge_threshold,
        postprocess_class_agnostic=False, verbose=0, force_postprocess_type=True)
    found = []
    for p in result.object_prediction_list:
        x1, y1, x2, y2 = p.bbox.to_xyxy()
        mask = None
        if p.mask is not None and p.mask.segmentation:
            mask = mask_utils.merge(mask_utils.frPyObjects(p.mask.segmentation, height, width))
        # polygon points are pixel indices: the box of pixel extents ends one further
        box = np.array([x1, y1, x2 + 1, y2 + 1] if p.mask is not None else [x1, y1, x2, y2],
                       np.float64)
        found.append(Found(int(p.category.id), float(p.score.value), box, mask, box))
    return found


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N×4) with every box of ``b`` (M×4), x1 y1 x2 y2."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class Agreement:
    """How many of SAHI's detections segpipe found: matched one to one, same class, by
    decreasing IoU of the boxes compared (``by``)."""

    sahi: int
    segpipe: int
    matched: int                 # pairs with box IoU >= the threshold
    box_ious: list[float]        # of the matched pairs
    mask_ious: list[float]       # of the matched pairs where both have masks
    model_box_ious: list[float]  # SAHI's box against segpipe's model box, matched pairs
    traced_mask_ious: list[float]  # SAHI's mask against segpipe's traced as SAHI traces

    @property
    def fraction(self) -> float:
        return self.matched / self.sahi if self.sahi else 1.0

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            if not values:
                return {}
            v = np.asarray(values)
            return {"min": round(float(v.min()), 4), "median": round(float(np.median(v)), 4),
                    "mean": round(float(v.mean()), 4)}

        return {"sahi": self.sahi, "segpipe": self.segpipe, "matched": self.matched,
                "fraction": round(self.fraction, 4), "box_iou": stats(self.box_ious),
                "mask_iou": stats(self.mask_ious),
                "model_box_iou": stats(self.model_box_ious),
                "traced_mask_iou": stats(self.traced_mask_ious)}


def agreement(sahi: list[Found], ours: list[Found], threshold: float = 0.9,
              model_boxes: bool = False) -> Agreement:
    """Match SAHI's detections to segpipe's (module doc): boxes of mask detections are
    compared as the bounding boxes of the masks, SAHI's definition, or with ``model_boxes``
    (SAHI run with ``masks=False``) as the model's boxes."""
    if not sahi or not ours:
        return Agreement(len(sahi), len(ours), 0, [], [], [], [])
    theirs = np.stack([f.box for f in sahi])
    mine = np.stack([f.mask_box if f.mask_box is not None and not model_boxes else f.box
                     for f in ours])
    ious = box_iou(theirs, mine)
    same = np.array([[s.label == o.label for o in ours] for s in sahi])
    ious = np.where(same, ious, -1.0)
    pairs = sorted(((ious[i, j], i, j) for i, j in zip(*np.nonzero(ious >= threshold))),
                   reverse=True)
    used_s, used_o = set(), set()
    box_ious, mask_ious, model_ious, traced_ious = [], [], [], []
    for iou, i, j in pairs:
        if i in used_s or j in used_o:
            continue
        used_s.add(i)
        used_o.add(j)
        box_ious.append(float(iou))
        model_ious.append(float(box_iou(sahi[i].box, ours[j].box)[0, 0]))
        if sahi[i].mask is not None and ours[j].mask is not None:
            mask_ious.append(float(mask_utils.iou([ours[j].mask], [sahi[i].mask], [0])[0, 0]))
            traced = traced_as_sahi(ours[j].mask)
            traced_ious.append(float(mask_utils.iou([traced], [sahi[i].mask], [0])[0, 0]))
    return Agreement(len(sahi), len(ours), len(used_s), box_ious, mask_ious, model_ious,
                     traced_ious)


def traced_as_sahi(rle: dict) -> dict:
    """An RLE mask as SAHI would hold it: traced to polygons (``cv2.findContours``, holes
    filled) and rasterised again by pycocotools."""
    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    height, width = rle["size"]
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    crop = np.ascontiguousarray(mask_utils.decode(rle)[y:y + h, x:x + w])
    polygons = [[v + (x if i % 2 == 0 else y) for i, v in enumerate(p)]
                for p in get_coco_segmentation_from_bool_mask(crop)]
    if not polygons:
        return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def _rle_box(rle: Optional[dict]) -> Optional[np.ndarray]:
    if rle is None:
        return None
    x, y, w, h = mask_utils.toBbox(rle)
    return np.array([x, y, x + w, y + h], np.float64)

"""Checkpoints of the optional model families, built here from the libraries' own configs with
seeded random weights (nothing downloads), made to give varied detections on real photos.

Random weights alone give the same detections for every image (fresh BatchNorm statistics
drown the input) with near-tied scores: BatchNorm statistics are taken from the sample photos
and the class biases spread so that each class keeps its top ~0.5% of places.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from images import photo

CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def yolo_checkpoint(path: Path, model_yaml: str = "yolo11n-seg.yaml", classes: int = 3,
                    seed: int = 0, image_size: int = 320, names=None) -> Path:
    """An Ultralytics checkpoint of ``model_yaml`` (as its trainer saves one: the model
    under ``model``, ``train_args`` with the task and input size)."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    segment = "-seg" in model_yaml
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (SegmentationModel if segment else DetectionModel)(model_yaml, nc=classes, verbose=False)
        letterbox = LetterBox(image_size, auto=False, stride=32)
        pixels = np.stack([letterbox(image=photo(name)) for name in CALIBRATION_PHOTOS])
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None   # a plain average over the calibration batch
        model.train()
        with torch.no_grad():
            model(batch)
        model.eval()
        head = model.model[-1]
        outputs: list = []
        hooks = [seq[-1].register_forward_hook(lambda m, i, o: outputs.append(o)) for seq in head.cv3]
        with torch.no_grad():
            model(batch)
        for hook in hooks:
            hook.remove()
        spread = torch.Generator().manual_seed(seed)
        for seq, logits in zip(head.cv3, outputs):
            top = torch.quantile(logits.transpose(0, 1).reshape(classes, -1), 0.995, dim=1)
            target = torch.logit(torch.tensor(0.3)) + 0.5 * torch.randn(classes, generator=spread)
            seq[-1].bias.data += target - top
    model.names = dict(enumerate(names or [f"thing_{k}" for k in range(classes)]))
    torch.save({"model": model, "train_args": {"task": "segment" if segment else "detect",
                                               "imgsz": image_size}}, path)
    return path


def mask2former_folder(path: Path, names=("cat", "dog", "car"), seed: int = 0,
                       side: int = 160) -> Path:
    """A tiny Mask2Former (Swin backbone) with seeded random weights and its image processor
    (shortest side ``side``), as ``save_pretrained`` writes them."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_layers=1, decoder_layers=3, num_queries=20, encoder_feedforward_dim=64,
        dim_feedforward=64, num_attention_heads=2, use_pretrained_backbone=False,
        id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": side, "longest_edge": side * 8 // 5}).save_pretrained(path)
    return path


def detr_folder(path: Path, names=("cat", "dog", "car", "boat"), seed: int = 0,
                side: int = 160) -> Path:
    """A tiny DETR (ResNet backbone) with seeded random weights and its image processor; the
    object queries spread so that they find different boxes."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            out_features=["stage4"], layer_type="basic")
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone,
                        use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=30,
                        id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetrForObjectDetection(config).eval()
        with torch.no_grad():   # peaked attention per query, heads that tell them apart
            model.model.query_position_embeddings.weight.normal_(0, 3.0)
            for layer in model.model.decoder.layers:
                layer.encoder_attn.q_proj.weight.mul_(8.0)
                layer.encoder_attn.k_proj.weight.mul_(8.0)
            model.bbox_predictor.layers[-1].weight.normal_(0, 1.0)
            model.class_labels_classifier.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": side, "longest_edge": side * 8 // 5}).save_pretrained(path)
    return path

"""The encode stage: predicted soft masks pasted into full-image COCO RLE (``paste``, exact to
torchvision's), packed detections between stages (``detections``), and the Ray Data callable
class that makes prediction rows (``encoder``).
"""

"""COCO files from stored predictions: which detections go in (``selection``), polygons for
labelling tools (``polygons``), the streaming JSON writer (``writer``) and its Ray fan-out
(``fanout``), and COCO evaluation (``evaluate``).
"""

"""Label formats for the tools after segpipe in a labelling loop: Label Studio tasks with
pre-annotations (``label_studio``, its brush RLE in ``brush``) and Ultralytics YOLO segmentation
datasets (``yolo``), written from ``predictions/`` by ``segpipe export --format``."""

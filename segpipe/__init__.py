"""segpipe: segment large image datasets with Mask R-CNN on Ray Data and write COCO annotations.

The flow runs one way, one module per stage:
``sources`` (list image files) → ``decode`` (CPU tasks) → ``predictor`` (actor pool of
Mask R-CNN models) → ``encode`` (CPU actors: paste masks, COCO RLE) → ``sinks`` (Parquet) →
``export`` (COCO JSON). ``pipeline`` wires the stages on Ray Data; ``config`` and ``cli`` parse
what the user asked for.
"""

__version__ = "0.1.0"

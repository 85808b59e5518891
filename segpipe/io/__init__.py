"""Where data comes from and goes to: storage (paths and URIs, atomic writes), the sources of a run
(``sources``: image files, tar shards, Parquet tables), ``decode`` (bytes to RGB pixels), the
prediction sink (``sinks``), the OUTPUT folder (``run_folder``), its lease and what segpipe
may remove or replace there (``lease``, ``ownership``), and the reader of ``predictions/``.

Flow: sources → decode → (model) → (encode) → sinks → (coco).
"""

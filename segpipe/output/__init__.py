"""OUTPUT, a run folder: its layout and the checks before a command writes it (``run_folder``), the
Parquet sink of predictions/ (``sinks``), reading predictions/ back (``predictions``) and
checking everything read (``damage``)."""

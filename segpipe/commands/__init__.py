"""The commands the CLI and the Python API call: ``segment`` (with its ``preflight`` checks and
its ``report``), ``export``, ``evaluate`` and ``render``. Each wires the rooms of io/, model/,
encode/, coco/ and cluster/ for one job.
"""

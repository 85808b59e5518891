"""The Ray cluster a command runs on: joining or starting Ray (``session``), what the cluster has
and can grow to (``shape``), and how the stages share it (``plan``).
"""

"""segpipe's version: what every file it writes records (ledgers, COCO info, run.json)."""

__version__ = "0.1.0"

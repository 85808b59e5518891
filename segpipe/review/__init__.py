"""The review queue: which images of a run a person should look at first (``signals``
scores each image from ``predictions/`` alone; ``queue`` ranks them and writes the ranking)."""

"""The predict stage: what a model is (``spec``, ``categories``), where its weights come from and
how they load (``weights``, ``build``), one forward pass (``inference``, ``precision``, ``devices``),
huge images in tiles (``tiles``), and the Ray Data callable class that runs it all (``stage``).
"""

"""From a run's stored predictions to annotations, whatever the format: which detections an
image's annotations keep and why the others are left out (``selection``), the ok images in
order with their kept detections (``rows``), masks as polygons (``polygons``), JSON arrays
written as they come (``jsonstream``), parts written by Ray tasks (``fanout``), and the export
formats there are (``formats``). ``coco``, ``labels`` and ``review`` build on it."""

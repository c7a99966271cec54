"""Detection data: the sample contract (samples), COCO json folders (coco) and TFRecord shards (tfrecord)."""

"""Segmentation data: image + mask folders, VOC (masks) and TFRecord shards (tfrecord)."""

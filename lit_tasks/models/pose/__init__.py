"""Pose regression: the RLE regressor."""

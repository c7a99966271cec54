"""Pose data: top-down geometry (geometry), samples (topdown), COCO keypoints (coco)."""

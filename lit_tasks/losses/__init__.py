"""Losses: IoU family, focal, margin softmax heads, Partial FC."""

"""Detectors: FCOS, VarifocalNet, DETR (each `build_<name>` returns model, criterion, postprocess)."""

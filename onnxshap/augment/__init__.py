"""Augment: plan the backward sweep (and refuse what is not exact), then build the augmented ONNX graph."""

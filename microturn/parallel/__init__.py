"""Tensor and sequence parallelism whose results are bitwise one device's."""

"""Latency-shaped CPU kernels, compiled on first use, with reference implementations."""

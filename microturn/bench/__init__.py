"""Benchmarks: scripts that print measured numbers (`microturn bench ...`)."""

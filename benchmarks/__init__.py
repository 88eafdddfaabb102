"""Benchmarks: one module per stage, run as ``python -m benchmarks.<stage>``; see ``_harness``."""

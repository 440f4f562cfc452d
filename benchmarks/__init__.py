"""Benchmark suites: kernels, model training step, ZeRO memory planning, reports."""

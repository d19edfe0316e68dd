"""Benchmarks (pytest-benchmark): pytest bench/ --benchmark-only"""

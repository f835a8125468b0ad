"""Benchmarks: ratios against references measured in the same run (these machines are noisy)."""

"""Benchmarks: step time measured side by side in one run."""

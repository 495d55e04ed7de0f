"""Benchmarks (apart from the tests): ratios against baselines measured side by side in one run."""

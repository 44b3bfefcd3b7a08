"""Benchmarks and evaluation: speed against baselines measured in the same run, and perplexity."""

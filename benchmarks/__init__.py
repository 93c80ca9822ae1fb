"""Benchmarks: ``python -m benchmarks.run`` measures LLMOS against Hugging Face baselines in one run."""

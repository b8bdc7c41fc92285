"""Benchmarks: our engine against Hugging Face baselines (and optionally vLLM) on one workload."""

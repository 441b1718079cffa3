"""Metric suites: ToyBench (exact toy-world scores), fidelity against dense, VBench, proxies."""

"""The toy world: procedural clips with known truth, a prompt grammar, and exact scoring (ToyBench)."""

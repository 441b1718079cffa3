"""GPU benchmark scripts (``make bench``): correctness first, then timings, JSON out."""

"""The engine of the benchmark harness: everything that is not an attention method."""

__version__ = "0.1.0"

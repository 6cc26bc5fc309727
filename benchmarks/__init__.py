"""Benchmarks: control-plane and data-plane comparisons of the proxy modes."""

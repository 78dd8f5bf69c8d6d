"""Pallas kernels and their pure-JAX references, one package per op."""

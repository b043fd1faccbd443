"""Attention over compressed KV caches: a jnp reference and Pallas kernels."""

"""Quantize-and-append into a TurboQuant cache as a fused kernel.

pallas_gpu.append writes one decode token (rotate, quantize, pack, write)
in one Mosaic GPU kernel; its reference is the XLA write path of
turboquant_cache (`append(impl="xla")`). CacheConfig(append_impl=
"pallas_gpu"), the default, uses it on a GPU where it covers the cache.
"""

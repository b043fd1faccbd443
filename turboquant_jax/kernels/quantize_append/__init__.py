"""Quantize-and-append into a TurboQuant cache as a fused kernel.

pallas_gpu.append writes one decode token (rotate, quantize, pack, write)
in one Mosaic GPU kernel; its reference is the XLA write path of
turboquant_cache (`append(impl="xla")`). CacheConfig(append_impl=
"pallas_gpu") uses it on a GPU where it covers the cache, and so does the
default "auto" wherever a decode step's append is not fused into the
attention kernel (decode_attention.append_attention, which reuses its
quantize_token).
"""

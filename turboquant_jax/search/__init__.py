"""Nearest-neighbour search with TurboQuant codes, and faiss baselines.

    from turboquant_jax import search
    index = search.build(key, base, search.IndexConfig(bits=4, unit_norm=True))
    scores, ids = search.search(index, queries, k=64)
    true_ids, _ = search.exact_top_k(base, queries, k=1)
    search.recall_at_1_at_k(ids, true_ids[:, 0])      # f64[64]

`search.baselines` (faiss PQ and RaBitQ) needs faiss-cpu.
"""

from turboquant_jax.search.index import Index
from turboquant_jax.search.index import IndexConfig
from turboquant_jax.search.index import bits_per_coordinate
from turboquant_jax.search.index import build
from turboquant_jax.search.index import derived_scales
from turboquant_jax.search.index import fixed_bytes
from turboquant_jax.search.index import score
from turboquant_jax.search.index import search
from turboquant_jax.search.metrics import METRICS
from turboquant_jax.search.metrics import exact_scores
from turboquant_jax.search.metrics import exact_top_k
from turboquant_jax.search.metrics import normalize
from turboquant_jax.search.metrics import recall_at_1_at_k

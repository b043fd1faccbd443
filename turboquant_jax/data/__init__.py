"""Data sets for the experiments, fetched into a git-ignored cache.

Set up once with `python -m turboquant_jax.data.fetch`.
"""

from turboquant_jax.data.cache import cache_dir
from turboquant_jax.data.glove import base_and_queries
from turboquant_jax.data.glove import fetch_glove
from turboquant_jax.data.glove import glove_path
from turboquant_jax.data.glove import load_glove

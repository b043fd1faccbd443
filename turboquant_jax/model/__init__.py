"""The Flax NNX decoder over explicit KV caches, and its HF loader.

    config = ModelConfig(vocab_size=..., d_model=..., ...)  # or load_hf(path)
    model = Transformer(config, rngs=nnx.Rngs(0))
    caches = model.init_caches(batch, capacity, layer_cache_configs(
        config, CacheConfig(kind="turboquant", key_bits=4, value_bits=2),
        edge_layers=1, edge=CacheConfig(kind="full")), key)
    logits, caches = forward_prefill(model, prompts, caches, prompt_lengths)
    logits, caches = forward(model, next_tokens, caches, caches[0].lengths)
"""

from turboquant_jax.model.attention import Attention
from turboquant_jax.model.attention import causal_attention
from turboquant_jax.model.config import ModelConfig
from turboquant_jax.model.config import RopeScaling
from turboquant_jax.model.config import layer_cache_configs
from turboquant_jax.model.hf import SafetensorsTensors
from turboquant_jax.model.hf import from_hf_tensors
from turboquant_jax.model.hf import hf_tensor_shapes
from turboquant_jax.model.hf import load_hf
from turboquant_jax.model.hf import read_config
from turboquant_jax.model.layers import MLP
from turboquant_jax.model.layers import RMSNorm
from turboquant_jax.model.layers import apply_rope
from turboquant_jax.model.layers import permute_for_interleaved
from turboquant_jax.model.layers import rope_frequencies
from turboquant_jax.model.layers import unpermute_from_interleaved
from turboquant_jax.model.transformer import Block
from turboquant_jax.model.transformer import Transformer
from turboquant_jax.model.transformer import forward
from turboquant_jax.model.transformer import forward_no_cache_jit
from turboquant_jax.model.transformer import forward_prefill
from turboquant_jax.model.sampling import generate

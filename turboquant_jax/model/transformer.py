"""The decoder: embedding, nnx.List of blocks, final RMSNorm, output head.

Shapes: B batch, T new tokens, V vocabulary, D model dim, L layers.

The caches are explicit: `model(tokens, caches, lengths_before)` returns
(logits, caches), one cache per layer of any kind (full, TurboQuant, KIVI),
chosen per layer by a tuple of CacheConfigs.

Under jit. The model is never mutated by a forward pass, and NNX modules are
pytrees, so the module goes straight into `jax.jit` as an argument (graph
mode and tree mode alike); `forward`, `forward_prefill` and
`forward_no_cache_jit` below are such jitted entry points:

    model = Transformer(config, rngs=nnx.Rngs(0))
    caches = model.init_caches(batch, capacity, cache_configs, key)
    logits, caches = forward_prefill(model, prompt, caches, prompt_lengths)
    logits, caches = forward(model, next_tokens, caches, caches[0].lengths)
"""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.kernels import decode_attention
from turboquant_jax.model import attention
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import layers


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.input_norm = layers.RMSNorm(c.d_model, eps=c.rms_eps, dtype=c.dtype)
    self.attn = attention.Attention(c, rngs=rngs)
    self.post_attn_norm = layers.RMSNorm(c.d_model, eps=c.rms_eps,
                                         dtype=c.dtype)
    self.mlp = layers.MLP(c.d_model, c.ffn_dim, dtype=c.dtype, rngs=rngs)

  def __call__(self, x, cache, lengths_before, *, prefill_lengths=None,
               impl=None):
    h, cache = self.attn(self.input_norm(x), cache, lengths_before,
                         prefill_lengths=prefill_lengths, impl=impl)
    x = x + h
    return x + self.mlp(self.post_attn_norm(x)), cache

  def forward_no_cache(self, x, positions):
    x = x + self.attn.forward_no_cache(self.input_norm(x), positions)
    return x + self.mlp(self.post_attn_norm(x))


def _check_tokens(tokens) -> None:
  shape = getattr(tokens, "shape", None)
  if (shape is None or len(shape) != 2
      or not jnp.issubdtype(tokens.dtype, jnp.integer)):
    raise ValueError(f"tokens must be an integer [batch, tokens] array, got "
                     f"shape {shape} dtype {getattr(tokens, 'dtype', None)}")


class Transformer(nnx.Module):
  """Decoder-only LM (Llama / Mistral / Qwen2 layout) over explicit caches."""

  def __init__(self, config: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dt = jnp.dtype(c.dtype)
    self.config = c
    self.embed = nnx.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=dt,
                           rngs=rngs)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layers)])
    self.norm = layers.RMSNorm(c.d_model, eps=c.rms_eps, dtype=c.dtype)
    if c.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False,
                                dtype=dt, param_dtype=dt, rngs=rngs)

  def init_caches(self, batch: int, capacity: int,
                  cache_configs: CacheConfig | Sequence[CacheConfig],
                  key: jax.Array | None = None) -> tuple:
    """Empty per-layer caches.

    Args:
      batch: sequences.
      capacity: tokens per sequence (at most config.max_seq_len).
      cache_configs: one CacheConfig for every layer, or one per layer
        (config.layer_cache_configs builds such a tuple).
      key: draws each layer's rotations (split per layer); None: key(0).

    Returns:
      A tuple of n_layers caches.
    """
    c = self.config
    if isinstance(cache_configs, CacheConfig):
      cache_configs = (cache_configs,) * c.n_layers
    cache_configs = tuple(cache_configs)
    if len(cache_configs) != c.n_layers:
      raise ValueError(f"len(cache_configs)={len(cache_configs)} must equal "
                       f"n_layers={c.n_layers}")
    if not isinstance(capacity, int) or not 1 <= capacity <= c.max_seq_len:
      raise ValueError(f"{capacity=} must be an integer in [1, "
                       f"max_seq_len={c.max_seq_len}]")
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, c.n_layers)
    return tuple(cache_lib.init(cfg, batch, c.n_kv_heads, capacity,
                                c.head_dim, key=k)
                 for cfg, k in zip(cache_configs, keys))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    if self.lm_head is None:
      return self.embed.attend(x).astype(jnp.float32)
    return self.lm_head(x).astype(jnp.float32)

  def _run(self, tokens, caches, lengths_before, prefill_lengths, impl,
           logits_at=None):
    _check_tokens(tokens)
    caches = tuple(caches)
    if len(caches) != self.config.n_layers:
      raise ValueError(f"len(caches)={len(caches)} must equal "
                       f"n_layers={self.config.n_layers}")
    lengths_before = jnp.asarray(lengths_before, jnp.int32)
    if lengths_before.shape != tokens.shape[:1]:
      raise ValueError(f"lengths_before.shape={lengths_before.shape}: "
                       f"expected ({tokens.shape[0]},)")
    if prefill_lengths is None and not isinstance(lengths_before,
                                                  jax.core.Tracer):
      for i, cache in enumerate(caches):
        if not isinstance(cache.lengths, jax.core.Tracer) and not bool(
            jnp.all(cache.lengths == lengths_before)):
          raise ValueError(f"lengths_before={lengths_before} disagrees with "
                           f"caches[{i}].lengths={cache.lengths}")
    x = self.embed(tokens)
    new = []
    for block, cache in zip(self.blocks, caches):
      x, cache = block(x, cache, lengths_before,
                       prefill_lengths=prefill_lengths, impl=impl)
      new.append(cache)
    if logits_at is not None:                 # one position per sequence
      x = x[jnp.arange(x.shape[0]), logits_at][:, None]
    return self._logits(x), tuple(new)

  def __call__(self, tokens: jax.Array, caches: Sequence,
               lengths_before: jax.Array, *,
               impl: decode_attention.Impl | None = None):
    """Runs T new tokens per sequence, appending them to every cache.

    Args:
      tokens: i32[B, T].
      caches: per-layer caches (init_caches), each holding lengths_before
        tokens.
      lengths_before: i32[B] tokens already cached; token t of sequence b is
        at position lengths_before[b] + t.
      impl: chunk_attention implementation (None: best available).

    Returns:
      (logits f32[B, T, V], the updated caches).
    """
    return self._run(tokens, caches, lengths_before, None, impl)

  def prefill(self, tokens: jax.Array, caches: Sequence, lengths: jax.Array,
              *, impl: decode_attention.Impl | None = None,
              last_only: bool = False):
    """Runs right-padded prompts into the caches, replacing their contents.

    Goes through cache.prefill, so fractional-bit TurboQuant caches pick
    their outlier channels from the prompts (append does not), and each
    sequence's cache length is its own prompt length.

    Args:
      tokens: i32[B, T] prompts, padded at the end.
      caches: per-layer caches (their old contents are dropped).
      lengths: i32[B] valid tokens per prompt (<= T).
      impl: chunk_attention implementation.
      last_only: compute logits only at each prompt's last token (what
        generation needs: at 128k tokens and a 128k vocabulary the full
        logits would take 64 GB).

    Returns:
      (logits f32[B, T, V] (those at t >= lengths[b] are meaningless), or
      f32[B, 1, V] at position lengths[b] - 1 if last_only; caches holding
      lengths[b] tokens each).
    """
    _check_tokens(tokens)
    lengths = jnp.asarray(lengths, jnp.int32)
    zeros = jnp.zeros(tokens.shape[:1], jnp.int32)
    return self._run(tokens, caches, zeros, lengths, impl,
                     logits_at=lengths - 1 if last_only else None)

  def forward_no_cache(self, tokens: jax.Array) -> jax.Array:
    """Logits f32[B, T, V] of tokens i32[B, T] at positions 0..T-1, with
    plain causal attention (no cache; for parity tests and training)."""
    _check_tokens(tokens)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed(tokens)
    for block in self.blocks:
      x = block.forward_no_cache(x, positions)
    return self._logits(x)


@jax.jit(static_argnames=("impl",))
def forward(model: Transformer, tokens: jax.Array, caches,
            lengths_before: jax.Array, impl=None):
  """jax.jit of model(tokens, caches, lengths_before)."""
  return model(tokens, caches, lengths_before, impl=impl)


@jax.jit(static_argnames=("impl",))
def forward_prefill(model: Transformer, tokens: jax.Array, caches,
                    lengths: jax.Array, impl=None):
  """jax.jit of model.prefill(tokens, caches, lengths)."""
  return model.prefill(tokens, caches, lengths, impl=impl)


@jax.jit
def forward_no_cache_jit(model: Transformer, tokens: jax.Array) -> jax.Array:
  """jax.jit of model.forward_no_cache(tokens)."""
  return model.forward_no_cache(tokens)

"""Generation over explicit KV caches: prefill, then a compiled decode loop.

Shapes: B batch, T prompt tokens (right-padded), N new tokens, V vocabulary.

    tokens, lengths = generate(model, prompts, prompt_lengths,
                               max_new_tokens=64, cache_configs=CacheConfig(
                                   kind="turboquant", key_bits=4,
                                   value_bits=4),
                               stop_tokens=(2,))

The prompts go through `Transformer.prefill` (which picks the outlier
channels of fractional-bit TurboQuant caches), then one `jax.lax.while_loop`
feeds each sampled token back through the model, appending it to every
layer's cache, so every generated token is read back quantized, as in the
paper. Prefill and the loop are one jit-compiled function: no Python runs
per token, and a second call with the same shapes and settings does not
retrace.

`chat_prompt_ids`, `chat_stop_tokens` and `chat_reply` drive a chat model
(SmolLM2's ChatML template) through `generate`.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.kernels import decode_attention
from turboquant_jax.model import chat
from turboquant_jax.model import transformer

# Round chat prompts up to a multiple of this many tokens, so that a
# conversation recompiles only when it crosses a multiple.
CHAT_BUCKET = 64


def sample_logits(logits: jax.Array, key: jax.Array | None, *,
                  temperature: float | jax.Array = 0.0,
                  top_k: int | None = None,
                  top_p: float | jax.Array | None = None,
                  greedy: bool | None = None) -> jax.Array:
  """One token per row of logits f32[B, V] -> i32[B].

  Greedy (argmax, first of ties) when `greedy`, or when it is None and
  temperature == 0. Otherwise logits / temperature are restricted to the
  top_k largest (ties at the k-th value kept), then to the smallest set of
  largest logits whose probability reaches top_p (the largest always kept),
  and a token is drawn with `key`.

  Args:
    logits: f32[B, V].
    key: a PRNG key (unused when greedy).
    temperature: > 0 unless greedy; may be traced.
    top_k: None or a static int in [1, V].
    top_p: None or a float in (0, 1]; may be traced.
    greedy: forces (True) or forbids (False) the argmax; None decides from
      a Python temperature.

  Returns:
    i32[B] token ids.
  """
  if greedy is None:
    greedy = float(temperature) == 0.0
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p is not None:
    desc = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs      # mass of larger logits
    cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1,
                     keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@jax.jit(static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p",
                          "pad_id", "impl"))
def _generate(model, tokens, lengths, caches, key, temperature, top_p,
              stop_tokens, *, max_new_tokens, greedy, top_k, use_top_p,
              pad_id, impl):
  """Prefill + while_loop decode; see `generate`."""
  b = tokens.shape[0]
  sample = lambda logits, k: sample_logits(
      logits, k, temperature=temperature, top_k=top_k,
      top_p=top_p if use_top_p else None, greedy=greedy)
  is_stop = lambda t: jnp.any(t[:, None] == stop_tokens[None, :], axis=-1)

  logits, caches = model.prefill(tokens, caches, lengths, impl=impl,
                                 last_only=True)
  last = logits[:, 0]                                             # [B, V]
  key, sub = jax.random.split(key)
  first = sample(last, sub)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = is_stop(first)
  n_gen = jnp.ones((b,), jnp.int32)

  def cond(state):
    i, _, _, done, _, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, out, prev, done, n_gen, caches, key = state
    # prev (token i - 1) sits at position lengths + i - 1.
    logits, caches = model(prev[:, None], caches, lengths + i - 1, impl=impl)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, pad_id, sample(logits[:, -1], sub))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    n_gen = jnp.where(done, n_gen, i + 1)
    done = done | is_stop(nxt)
    return i + 1, out, nxt, done, n_gen, caches, key

  state = (jnp.int32(1), out, first, done, n_gen, caches, key)
  _, out, _, _, n_gen, _, _ = jax.lax.while_loop(cond, body, state)
  return out, n_gen


def _padded_stop_tokens(stop: tuple[int, ...]) -> jax.Array:
  """i32[8k]: the ids, then -1 (never sampled), so that up to 8 stop
  tokens share one compiled loop."""
  size = max(8, -(-len(stop) // 8) * 8)
  return jnp.asarray(stop + (-1,) * (size - len(stop)), jnp.int32)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def generate(model: transformer.Transformer, prompt_tokens: jax.Array,
             prompt_lengths: jax.Array, *, max_new_tokens: int,
             cache_configs: CacheConfig | Sequence[CacheConfig],
             capacity: int | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), key: jax.Array | None = None,
             impl: decode_attention.Impl | None = None,
             cache_key: jax.Array | None = None, pad_id: int = 0
             ) -> tuple[jax.Array, jax.Array]:
  """Continues right-padded prompts by up to max_new_tokens tokens each.

  Every generated token except the last is appended to every layer's cache
  (quantized, for a TurboQuant or KIVI cache) before the next one is
  predicted. A sequence ends after emitting a stop token (which is kept in
  its output) or max_new_tokens tokens; the loop exits as soon as all have
  ended. Runs under an outer jax.jit too (value checks on traced lengths
  are then skipped).

  Args:
    model: the Transformer.
    prompt_tokens: i32[B, T], each prompt padded at the end.
    prompt_lengths: i32[B] valid tokens per prompt, in [1, T].
    max_new_tokens: N >= 1. Shapes and static settings (T, B, N, capacity,
      cache configs, greedy or not, top_k, whether top_p is set, impl) are
      part of the compiled loop; prompt values, lengths, temperature, top_p
      and up to 8 stop tokens are not (changing them does not retrace).
    cache_configs: one CacheConfig for all layers or one per layer
      (model_lib.layer_cache_configs).
    capacity: tokens per cache; None: T + max_new_tokens. Must hold the
      longest prompt plus max_new_tokens.
    temperature: 0 for greedy decoding (the default), else > 0.
    top_k: keep only the k most likely tokens (sampling only).
    top_p: nucleus sampling mass in (0, 1] (sampling only).
    stop_tokens: token ids that end a sequence (e.g. eos and ChatML's
      <|im_end|>).
    key: PRNG key for sampling (required when temperature > 0).
    impl: decode_attention implementation (None: best available).
    cache_key: draws the caches' rotations (None: jax.random.key(0)).
    pad_id: written after a sequence's end.

  Returns:
    (tokens i32[B, N], lengths i32[B]): the generated tokens of each
    sequence, then pad_id from lengths[b] on; lengths counts a final stop
    token.

  Raises:
    ValueError: bad shapes or settings, a prompt longer than the capacity,
      or a capacity too small for prompt + max_new_tokens.
  """
  config = model.config
  tokens = prompt_tokens
  if not hasattr(tokens, "shape"):
    tokens = jnp.asarray(tokens, jnp.int32)
  if (len(tokens.shape) != 2
      or not jnp.issubdtype(tokens.dtype, jnp.integer)):
    raise ValueError(f"prompt_tokens must be an integer [batch, tokens] "
                     f"array, got shape {tokens.shape} dtype {tokens.dtype}")
  b, t = tokens.shape
  if b < 1 or t < 1:
    raise ValueError(f"prompt_tokens.shape={tokens.shape} must be non-empty")
  lengths = prompt_lengths
  if not hasattr(lengths, "shape"):
    lengths = jnp.asarray(lengths, jnp.int32)
  if (lengths.shape != (b,)
      or not jnp.issubdtype(lengths.dtype, jnp.integer)):
    raise ValueError(f"prompt_lengths must be an integer array of shape "
                     f"({b},), got {lengths.shape} {lengths.dtype}")
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
      or max_new_tokens < 1):
    raise ValueError(f"{max_new_tokens=} must be an integer >= 1")
  if capacity is None:
    capacity = t + max_new_tokens
    if capacity > config.max_seq_len:
      raise ValueError(
          f"prompt tokens T={t} + {max_new_tokens=} exceeds the model's "
          f"max_seq_len={config.max_seq_len}")
  elif isinstance(capacity, bool) or not isinstance(capacity, int):
    raise ValueError(f"{capacity=} must be an integer")
  if t > capacity:
    raise ValueError(f"prompt_tokens of length T={t} is longer than the "
                     f"cache {capacity=}")
  if _is_concrete(lengths):
    lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
    if lo < 1 or hi > t:
      raise ValueError(f"prompt_lengths={np.asarray(lengths).tolist()} must "
                       f"lie in [1, T={t}]")
    if hi + max_new_tokens > capacity:
      raise ValueError(
          f"{capacity=} is too small for the longest prompt ({hi} tokens) "
          f"+ {max_new_tokens=}; need at least {hi + max_new_tokens}")
  if (isinstance(temperature, bool)
      or not isinstance(temperature, (int, float))
      or not math.isfinite(temperature) or temperature < 0):
    raise ValueError(f"{temperature=} must be a finite number >= 0 (0: "
                     "greedy)")
  greedy = temperature == 0
  if top_k is not None and (isinstance(top_k, bool)
                            or not isinstance(top_k, int)
                            or not 1 <= top_k <= config.vocab_size):
    raise ValueError(f"{top_k=} must be None or an integer in [1, "
                     f"vocab_size={config.vocab_size}]")
  if top_p is not None and (isinstance(top_p, bool)
                            or not isinstance(top_p, (int, float))
                            or not 0 < top_p <= 1):
    raise ValueError(f"{top_p=} must be None or a number in (0, 1]")
  if not greedy and key is None:
    raise ValueError(f"{temperature=} samples: pass key=jax.random.key(...)")
  stop = tuple(int(s) for s in stop_tokens)
  if any(not 0 <= s < config.vocab_size for s in stop):
    raise ValueError(f"stop_tokens={stop} must be ids in [0, "
                     f"{config.vocab_size})")
  if not 0 <= pad_id < config.vocab_size:
    raise ValueError(f"{pad_id=} must be an id in [0, {config.vocab_size})")

  # chunk_attention imports its Pallas backends on first use; the imports
  # add JAX config options, which are part of jit's cache key, so without
  # this a process's first two calls would both trace and compile.
  decode_attention._impls()  # pylint: disable=protected-access
  caches = model.init_caches(b, capacity, cache_configs, cache_key)
  key = jax.random.key(0) if key is None else key
  return _generate(
      model, tokens.astype(jnp.int32), lengths.astype(jnp.int32), caches,
      key, jnp.float32(temperature if not greedy else 1.0),
      jnp.float32(1.0 if top_p is None else top_p),
      _padded_stop_tokens(stop),
      max_new_tokens=max_new_tokens, greedy=greedy,
      top_k=None if greedy else top_k,
      use_top_p=top_p is not None and not greedy, pad_id=pad_id, impl=impl)


def chat_prompt_ids(tokenizer, chat_template: str,
                    messages: Sequence[Mapping[str, Any]]) -> list[int]:
  """Token ids of the chat prompt, ending with an open assistant turn.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (GGUFModel.tokenizer).
    chat_template: the Jinja template (GGUFModel.chat_template).
    messages: [{"role": "user", "content": "..."}, ...].

  Returns:
    The ids; like Hugging Face's apply_chat_template(tokenize=True), the
    tokenizer adds no BOS/EOS of its own (the template writes them).
  """
  text = chat.apply_chat_template(chat_template, messages,
                                  add_generation_prompt=True)
  return list(tokenizer.encode(text, add_special_tokens=False).ids)


def chat_stop_tokens(tokenizer, special_tokens: Mapping[str, int],
                     end_tokens: Sequence[str] = ("<|im_end|>",)
                     ) -> tuple[int, ...]:
  """The eos id and the ids of the turn-end tokens the vocabulary has."""
  ids = [special_tokens["eos_token_id"]] if (
      "eos_token_id" in special_tokens) else []
  for text in end_tokens:
    if (i := tokenizer.token_to_id(text)) is not None:
      ids.append(i)
  return tuple(dict.fromkeys(int(i) for i in ids))


def chat_reply(model: transformer.Transformer, tokenizer, chat_template: str,
               messages: Sequence[Mapping[str, Any]], *,
               stop_tokens: Sequence[int], max_new_tokens: int,
               cache_configs: CacheConfig | Sequence[CacheConfig],
               bucket: int = CHAT_BUCKET, **kwargs) -> tuple[str, list[int]]:
  """The assistant's next message, generated through `generate`.

  Args:
    model: the Transformer.
    tokenizer, chat_template: as for `chat_prompt_ids`.
    messages: the conversation so far.
    stop_tokens: e.g. `chat_stop_tokens(...)`.
    max_new_tokens, cache_configs: as for `generate`.
    bucket: the prompt is padded to a multiple of this many tokens (fewer
      recompiles as a conversation grows).
    **kwargs: more `generate` arguments (temperature, key, ...).

  Returns:
    (the reply text without its stop token, the generated ids with it).
  """
  ids = chat_prompt_ids(tokenizer, chat_template, messages)
  t = -(-len(ids) // bucket) * bucket
  prompt = np.zeros((1, t), np.int32)
  prompt[0, :len(ids)] = ids
  out, n = generate(model, jnp.asarray(prompt),
                    jnp.asarray([len(ids)], jnp.int32),
                    max_new_tokens=max_new_tokens,
                    cache_configs=cache_configs, stop_tokens=stop_tokens,
                    **kwargs)
  new = np.asarray(out[0, :int(n[0])]).tolist()
  text_ids = new[:-1] if new and new[-1] in set(stop_tokens) else new
  return tokenizer.decode(text_ids, skip_special_tokens=False), new

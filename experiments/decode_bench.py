"""Decode speed of a SmolLM2-135M- or Llama-3.1-8B-shaped model: full cache
vs TurboQuant.

The weights are random (speed does not depend on their values; the real
weights, 94 MiB for SmolLM2 and 16 GB for Llama, are over what one device
call carries) and the caches are filled with random contents at `context`
tokens (building them by prefill would only cost time). Each row:
`steps_per_call` greedy decode steps (1 token per sequence through every
layer, appending to every cache) in one
jitted `fori_loop` with the caches in its carry and donated, as in
generation, so every cache is updated in place; the caches of a batch size
are timed in `rounds` interleaved rounds of `reps` calls each; step_ms = the
median call over all of them / steps_per_call (round_step_ms: each round's
median, the spread); tokens_per_s = batch / step_ms;
kernel_options = the `pallas_gpu` defaults impl=None runs a TurboQuant
cache with on a GPU. (A jitted single step without donation copies every
cache each call: 3.8x as many bytes for the full bf16 cache as for a
4-bit one. The runs before 2026-11-29 measured that way.)

    python -m experiments.decode_bench --config=configs/decode_bench.py \
        --workdir=results/decode_bench/h200
"""

import dataclasses
import functools
import inspect
import statistics

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments import timing
from turboquant_jax import cache as cache_lib
from turboquant_jax import results
from turboquant_jax import model as model_lib
from turboquant_jax.kernels.decode_attention import pallas_gpu


def define_flags() -> None:
  """Defines the flags; called only when run as a program (flags defined
  at import would clash with other experiment modules in one process)."""
  config_flags.DEFINE_config_file("config", "configs/decode_bench.py")
  flags.DEFINE_string("workdir", "runs/decode_bench", "output dir")


# SmolLM2-135M-Instruct (DATA.md; read from its GGUF metadata).
SMOLLM2 = model_lib.ModelConfig(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
    head_dim=64, ffn_dim=1536, rms_eps=1e-5, rope_theta=100000.0,
    tie_embeddings=True, max_seq_len=16384, dtype="bfloat16")
# Llama-3.1-8B's shape (its config.json: 32 layers, 32 query / 8 KV heads of
# 128, SwiGLU 14336, RoPE 500000 with llama3 scaling): the head dim of most
# served models, where decode at long context reads mostly the cache.
LLAMA3_8B = model_lib.ModelConfig(
    vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    head_dim=128, ffn_dim=14336, rms_eps=1e-5, rope_theta=500000.0,
    rope_scaling=model_lib.RopeScaling(), max_seq_len=131072,
    dtype="bfloat16")
# config.model -> (shape, the name results rows carry).
MODELS = {"smollm2": (SMOLLM2, "SmolLM2-135M"),
          "llama3_8b": (LLAMA3_8B, "Llama-3.1-8B")}


def _randomize(tree, key, length):
  """Random contents for every cache leaf; lengths set to `length`."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, leaf in zip(keys, leaves):
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      out.append(jax.random.randint(k, leaf.shape, 0, 256, jnp.int32)
                 .astype(leaf.dtype))
    else:
      out.append(jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 1.5)
                 .astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def _filled(cache, key, length):
  batch = cache.lengths.shape[0]
  lengths = jnp.full((batch,), length, jnp.int32)
  fields = {}
  for f in dataclasses.fields(cache):
    if f.name in ("keys", "values", "window_keys", "window_values"):
      v = getattr(cache, f.name)
      fields[f.name] = None if v is None else _randomize(v, key, length)
  return dataclasses.replace(cache, lengths=lengths, **fields)


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


@functools.partial(jax.jit, static_argnames=("impl", "steps", "unroll"),
                   donate_argnames=("caches",))
def decode_steps(model, tokens, caches, lengths, *, impl, steps: int,
                 unroll: bool = False):
  """`steps` greedy decode steps from tokens i32[B, 1] at positions
  `lengths`; returns (the last tokens [B, 1], the caches). unroll: the
  steps written out one after another (no while loop at run time)."""
  def step(i, carry):
    tok, caches = carry
    logits, caches = model(tok, caches, lengths + i, impl=impl)
    return jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(tok.dtype), \
        caches
  return jax.lax.fori_loop(0, steps, step, (tokens, caches), unroll=unroll)


def filled_caches(model, config, batch: int, kind: str, key_bits,
                  value_bits, append_impl: str,
                  cache_options: dict | None = None) -> tuple:
  """(tokens i32[B, 1], one cache per layer filled at config.context
  tokens of config.capacity) for a row of config.caches (cache_options:
  its optional last element, more CacheConfig fields)."""
  cfg = (cache_lib.CacheConfig(kind="full", dtype="bfloat16")
         if kind == "full" else
         cache_lib.CacheConfig(kind=kind, key_bits=key_bits,
                               value_bits=value_bits, append_impl=append_impl,
                               **dict(cache_options or {})))
  caches = model.init_caches(batch, config.capacity, cfg, jax.random.key(1))
  caches = tuple(_filled(c, jax.random.fold_in(jax.random.key(2), i),
                         config.context) for i, c in enumerate(caches))
  tokens = jax.random.randint(jax.random.key(3), (batch, 1), 0,
                              model.config.vocab_size)
  return tokens, caches


def model_config(config) -> tuple[model_lib.ModelConfig, str]:
  """(the model's shape, its name) for config.model (default "smollm2")."""
  name = config.get("model", "smollm2")
  if name not in MODELS:
    raise ValueError(f"config.model={name!r} must be one of {sorted(MODELS)}")
  return MODELS[name]


def kernel_defaults() -> dict:
  """pallas_gpu.attention's default options (what impl=None runs on a GPU
  for a TurboQuant cache), recorded with each row that may use them."""
  sig = inspect.signature(pallas_gpu.attention)
  return {name: p.default for name, p in sig.parameters.items()
          if p.kind == p.KEYWORD_ONLY and name not in ("scale", "interpret")}


def run(config, workdir) -> list[dict]:
  """Runs (or resumes, a batch size at a time) the sweep into workdir;
  returns all rows.

  The caches of one batch size are timed in `config.rounds` interleaved
  rounds (each round times every cache `reps` calls, starting one cache
  later than the round before), so a drift of the device's clocks or of
  the host over the run falls on every cache alike, not on whichever
  comes last: step_ms is the median over every round's calls, and
  round_step_ms the median of each round, their spread."""
  writer = results.Writer(workdir, config)
  done = writer.done_keys(("batch", "cache"))
  device = jax.devices()[0].device_kind
  shape, model_name = model_config(config)
  model = model_lib.Transformer(shape, rngs=nnx.Rngs(config.seed))
  steps = config.steps_per_call
  rounds = config.get("rounds", 1)
  for batch in config.batches:
    specs = [s for s in config.caches if (batch, s[0]) not in done]
    states, steps_of, resets, calls, errors = {}, {}, {}, {}, {}
    for name, kind, kb, vb, impl, append_impl, *extra in specs:
      states[name] = filled_caches(model, config, batch, kind, kb, vb,
                                   append_impl, *extra)
      lengths = states[name][1][0].lengths
      # Each call appends `steps` tokens after the same `context` ones (the
      # lengths reset; what lies past them is overwritten), so every call
      # does the same work. Donated: one lengths buffer per cache.
      resets[name] = lambda state, lengths=lengths: (state[0], tuple(
          dataclasses.replace(c, lengths=jnp.copy(lengths))
          for c in state[1]))
      steps_of[name] = lambda state, impl=impl, lengths=lengths: \
          decode_steps(model, *state, lengths, impl=impl, steps=steps,
                       unroll=config.get("unroll", False))
      calls[name] = []
    for rnd in range(rounds):
      order = specs[rnd % len(specs):] + specs[:rnd % len(specs)] \
          if specs else []
      for name, *_ in order:
        if name in errors:
          continue
        try:
          times, states[name] = timing.in_place_times_ms(
              steps_of[name], states[name], resets[name],
              warmup=config.warmup if rnd == 0 else 0, reps=config.reps)
          calls[name].append(times)
        except Exception as e:   # a row records the failure
          errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    for name, kind, kb, vb, impl, append_impl, *extra in specs:
      mem = cache_lib.memory(states[name][1][0])
      err = errors.get(name)
      ms = (None if err else
            statistics.median(t for r in calls[name] for t in r) / steps)
      row = dict(model=f"{model_name} (random weights)", cache=name,
                 kind=kind, key_bits=kb, value_bits=vb, impl=impl,
                 append_impl=append_impl,
                 cache_options=dict(extra[0]) if extra else {},
                 batch=batch, context=config.context, steps_per_call=steps,
                 unroll=config.get("unroll", False),
                 step_ms=ms, tokens_per_s=batch / ms * 1e3 if ms else None,
                 rounds=rounds,
                 round_step_ms=None if err else [
                     statistics.median(r) / steps for r in calls[name]],
                 bytes_per_token=mem["bytes_per_token"] * shape.n_layers,
                 kernel_options=(kernel_defaults() if kind == "turboquant"
                                 and impl in (None, "pallas_gpu") else None),
                 device=device, error=err)
      writer.write(row)
      spread = ("" if err else " rounds " + " ".join(
          f"{x:.3f}" for x in row["round_step_ms"]))
      print(f"B={batch:<3} {name:>15}: {ms} ms/step, "
            f"{row['tokens_per_s']} tok/s{spread} {err or ''}")
    del states
  return writer.rows()


if __name__ == "__main__":
  define_flags()
  app.run(main)

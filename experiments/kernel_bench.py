"""Times decode attention over compressed caches against bf16 attention.

For each (batch, seq_len, bits) it builds a TurboQuant cache holding random
codes and norms (timing does not depend on the values; correctness is
checked separately on real quantized data), then times each of our impls
and, on the same shapes in the same run, cuDNN bf16 and XLA bf16 attention
(jax.nn.dot_product_attention). One row per (impl, shape) in results.jsonl.
Times are device time per call: config.loops calls run back to back in one
jitted function, written out one after another (config.unroll, since
session 15: a fori_loop's own cost, 20-30 µs an iteration on the H200, hid
under small calls and favoured the ones with many kernels; NOTES.md), or
in a fori_loop (unroll False, the runs of 2026-11-29/30), and timed on the
GPU itself (config.gpu_timer: each run's kernels' span in a jax.profiler
trace; the host's dispatch of a run of many small kernels is otherwise
part of a B = 1 time); config.loops = 0: wall clock of single calls,
dispatch included, as the runs before 2026-11-29. Each (batch, seq_len)
compiles cuDNN, XLA bf16 and every width first, then times them in turn for
config.rounds rounds (since session 14; before, each once, cuDNN first),
so that the device's slow spells touch both sides of a ratio; rows keep
every round. Quantize-and-append rows time
config.append_impls ("xla", and the fused "pallas_gpu" kernel for one
token) the same way, in place.

    python -m experiments.kernel_bench --config=configs/kernel_bench.py \
        --workdir=results/kernel_bench/h200
"""

import dataclasses
import itertools
import pathlib
import statistics
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from experiments.timing import looped
from experiments.timing import profiled_ms
from experiments.timing import time_in_place_ms
from experiments.timing import time_ms
from turboquant_jax import cache as cache_lib
from turboquant_jax import results
from turboquant_jax.kernels import decode_attention as da
from turboquant_jax.kernels.quantize_append import pallas_gpu as quantize_append

def define_flags() -> None:
  """Defines the flags; called only when run as a program (flags defined
  at import would clash with other experiment modules in one process)."""
  config_flags.DEFINE_config_file("config", "configs/kernel_bench.py")
  flags.DEFINE_string("workdir", "runs/kernel_bench", "output dir")





def random_cache(key, cfg, batch, kv_heads, seq_len, head_dim):
  """A full TurboQuant cache with random codes and norms in [0.5, 1.5)."""
  cache = cache_lib.init(cfg, batch, kv_heads, seq_len, head_dim, key=key)
  leaves, tree = jax.tree.flatten((cache.keys, cache.values))
  keys = jax.random.split(key, len(leaves))
  new = []
  for k, leaf in zip(keys, leaves):
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      new.append(jax.random.randint(k, leaf.shape, 0, 256, jnp.int32)
                 .astype(leaf.dtype))
    else:
      new.append(jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 1.5)
                 .astype(leaf.dtype))
  keys_, values_ = jax.tree.unflatten(tree, new)
  lengths = jnp.full((batch,), seq_len, jnp.int32)
  return cache.__class__(**{**cache.__dict__, "keys": keys_,
                            "values": values_, "lengths": lengths})


def impl_options(config, impl: str) -> dict:
  """Keyword options for decode_attention(impl=...): the config's
  `pallas_gpu` options (layout, lookup_mode, ...) for that kernel."""
  return dict(config.pallas_gpu) if impl == "pallas_gpu" else {}


def attention_timer(config, fn, q: jax.Array, *rest) -> Callable[[], float]:
  """fn(q, *rest) compiled now; returns a function that times it once:
  ms per call of config.loops calls in one jitted function (device time,
  dispatch amortized; timing.looped, unrolled with config.unroll; with
  config.gpu_timer the span of each run's kernels on the GPU, from a
  profiler trace: timing.profiled_ms), or with config.loops = 0 of single
  jitted calls (wall clock, one dispatch and sync included, as the runs
  before 2026-11-29 were). Compiled once, timed in as many rounds as
  asked, so that rounds can interleave several functions."""
  if config.loops:
    compiled = looped(fn, config.loops, config.get("unroll", False)).lower(
        q, *rest).compile()
    if config.get("gpu_timer", False):
      return lambda: profiled_ms(compiled, q, *rest, warmup=config.warmup,
                                 reps=config.reps, loops=config.loops)
    return lambda: time_ms(compiled, q, *rest, warmup=config.warmup,
                           reps=config.reps) / config.loops
  jitted = jax.jit(fn)
  return lambda: time_ms(jitted, q, *rest, warmup=config.warmup,
                         reps=config.reps)


def interleaved_rounds(timers: dict, rounds: int) -> tuple[dict, dict]:
  """({name: [ms of each round]}, {name: error}) of the timers (name ->
  a zero-argument function returning ms), called in turn `rounds` times:
  a slow spell of the device (clocks, a neighbour) then touches every
  name alike instead of one cell. A timer that raises gets its error and
  is dropped from later rounds."""
  times = {name: [] for name in timers}
  errors = {}
  for _ in range(rounds):
    for name, timer in timers.items():
      if name in errors:
        continue
      try:
        times[name].append(timer())
      except Exception as e:  # noqa: BLE001 - recorded in the row
        errors[name] = error_text(e)
  return times, errors


def error_text(e: Exception) -> str:
  """An exception as a row's `error` field: its type and message, cut."""
  return f"{type(e).__name__}: {str(e)[:300]}"


def cache_config(config, bits: float) -> cache_lib.CacheConfig:
  """The TurboQuant cache of a row: keys and values at `bits`, codebooks
  on the grid where config.grid_centroids."""
  return cache_lib.CacheConfig(
      key_bits=bits, value_bits=bits,
      grid_centroids=bool(config.get("grid_centroids", False)))


def check_correctness(impl: str, cfg: cache_lib.CacheConfig, head_dim: int,
                      **options) -> float:
  """Max |impl - reference| on a small cache of real quantized data
  stored as `cfg` says."""
  b, kvh, g, s = 2, 2, 4, 1024
  key = jax.random.key(1)
  k = jax.random.normal(key, (b, kvh, s, head_dim))
  v = jax.random.normal(jax.random.key(2), (b, kvh, s, head_dim))
  c = cache_lib.prefill(cache_lib.init(cfg, b, kvh, s, head_dim, key=key),
                        k, v, jnp.array([s, 700], jnp.int32))
  q = jax.random.normal(jax.random.key(3), (b, kvh * g, head_dim))
  ref = da.decode_attention(q, c, c.lengths, impl="reference")
  out = da.decode_attention(q, c, c.lengths, impl=impl, **options)
  return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def bench_append(config, writer, done, device):
  """Quantize-and-append throughput (rows op=quantize_append) of each of
  config.append_impls: "xla", and "pallas_gpu" (the fused kernel: one
  token, integer bits up to 4 or their outlier split; other rows are
  skipped)."""
  hkv, d = config.kv_heads, config.head_dim
  for batch in config.append_batches:
    for bits in config.bits:
      cfg = cache_config(config, bits)
      cache = cache_lib.init(cfg, batch, hkv, config.append_capacity, d,
                             key=jax.random.key(0))
      for tokens, impl in itertools.product(config.append_tokens,
                                            config.append_impls):
        if ("quantize_append", impl, batch, tokens, bits) in done:
          continue
        if impl == "pallas_gpu" and quantize_append.supported(cache, tokens):
          continue
        k = jax.random.normal(jax.random.key(tokens), (batch, hkv, tokens, d),
                              jnp.bfloat16)
        # One jitted program with the cache donated, so the write is in
        # place as in a decode step (without donation every call would also
        # copy the whole cache); the lengths reset before each append, so
        # every append writes at the same position and does the same work.
        # config.loops appends a call (device time, one dispatch a call).
        loops = max(config.loops, 1)
        start = cache.lengths

        def appends(c, k, impl=impl, start=start, loops=loops):
          one = lambda _, c: cache_lib.turboquant_cache.append(
              dataclasses.replace(c, lengths=start), k, k, impl=impl)
          return jax.lax.fori_loop(0, loops, one, c)

        fn = jax.jit(appends, donate_argnums=0)
        t, cache = time_in_place_ms(
            lambda c, k=k: fn(c, k), cache,
            lambda c: dataclasses.replace(c, lengths=jnp.copy(start)),
            warmup=config.warmup, reps=config.reps)
        t /= loops
        writer.write(dict(op="quantize_append", impl=impl, batch=batch,
                          seq_len=tokens, tokens=tokens,
                          capacity=config.append_capacity, kv_heads=hkv,
                          head_dim=d, key_bits=bits, value_bits=bits,
                          time_ms=t, tokens_per_s=batch * tokens / t * 1e3,
                          appends_per_call=loops,
                          grid_centroids=cfg.grid_centroids, device=device))
        print(f"append {impl:>10} B={batch:<3} T={tokens:<5} bits={bits}: "
              f"{t:.3f} ms "
              f"({batch * tokens / t * 1e3:,.0f} tokens/s)")


def bench_quantize(config, writer, done, device):
  """The paper's Table 2 shapes: quantize N vectors at 4 bits (mse)."""
  import turboquant_jax as tq
  for dim in config.quantize_dims:
    if ("quantize_vectors", "xla", config.quantize_n, dim, 4) in done:
      continue
    q = tq.make_quantizer(jax.random.key(0), dim, 4)
    x = jax.random.normal(jax.random.key(1), (config.quantize_n, dim))
    fn = jax.jit(lambda x: tq.quantize(q, x))
    t = time_ms(fn, x, warmup=config.warmup, reps=config.reps)
    writer.write(dict(op="quantize_vectors", impl="xla", batch=config.quantize_n,
                      seq_len=dim, dim=dim, n=config.quantize_n, key_bits=4,
                      time_ms=t, seconds=t / 1e3, device=device))
    print(f"quantize {config.quantize_n} x {dim} at 4 bits: {t:.3f} ms")


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


def run(config, workdir) -> pathlib.Path:
  """Runs (or resumes) the sweep into workdir; returns table.md's path."""
  writer = results.Writer(workdir, config)
  done = writer.done_keys(("op", "impl", "batch", "seq_len", "key_bits"))
  device = jax.devices()[0].device_kind
  hq, hkv, d = config.q_heads, config.kv_heads, config.head_dim
  print(f"device: {device}  backend: {jax.default_backend()}")
  if config.check:
    for impl in config.impls:
      for bits in config.bits:
        try:
          err = check_correctness(impl, cache_config(config, bits), d,
                                  **impl_options(config, impl))
          print(f"check {impl:>10} bits={bits}: rel max err {err:.2e}")
        except Exception as e:   # report and go on: a row says it failed
          print(f"check {impl:>10} bits={bits}: FAILED {type(e).__name__}: "
                f"{str(e)[:2000]}")
  bench_quantize(config, writer, done, device)
  bench_append(config, writer, done, device)
  key = jax.random.key(config.seed)
  for batch in config.batches:
    for seq_len in config.seq_lens:
      bench_cell(config, writer, done, device, key, batch, seq_len)
  table = write_table(workdir)
  print(f"table: {table}")
  return table


def bench_cell(config, writer, done, device, key, batch: int,
               seq_len: int) -> None:
  """Decode-attention rows of one (batch, seq_len): cuDNN and XLA bf16 and
  each pending (impl, bits), compiled first, then timed in
  config.rounds interleaved rounds (interleaved_rounds). time_ms is the
  median of the rounds (each round a median of config.reps loops); the
  rows keep every round (time_ms_rounds, cudnn_bf16_ms_rounds) and the
  speedup over cuDNN per round (speedup_rounds: cuDNN's time in the same
  round over ours). Nothing is timed where every row is done."""
  hq, hkv, d = config.q_heads, config.kv_heads, config.head_dim
  pending = [(impl, bits) for bits in config.bits for impl in config.impls
             if ("decode_attention", impl, batch, seq_len, bits) not in done
             and not (impl == "xla" and batch * seq_len * hkv * d * 8
                      > config.max_xla_bytes)]
  base_pending = [impl for impl in ("cudnn", "xla") if (
      "decode_attention", f"{impl}_bf16", batch, seq_len, 16) not in done]
  if not pending and not base_pending:
    return
  kq, kk, kv_ = jax.random.split(jax.random.fold_in(key, seq_len), 3)
  q = jax.random.normal(kq, (batch, 1, hq, d), jnp.bfloat16)
  kb = jax.random.normal(kk, (batch, seq_len, hkv, d), jnp.bfloat16)
  vb = jax.random.normal(kv_, (batch, seq_len, hkv, d), jnp.bfloat16)
  bf16_bytes = 2 * kb.size * 2
  timers, errors, caches = {}, {}, {}
  for impl in ("cudnn", "xla"):
    fn = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, implementation=impl)
    try:
      timers[impl] = attention_timer(config, fn, q, kb, vb)
    except Exception as e:  # noqa: BLE001 - cuDNN is absent on the CPU
      errors[impl] = error_text(e)
      print(f"bf16 {impl} failed: {errors[impl]}")
  for impl, bits in pending:
    if bits not in caches:
      cfg = cache_config(config, bits)
      caches[bits] = random_cache(jax.random.fold_in(key, int(bits * 10)),
                                  cfg, batch, hkv, seq_len, d)
    options = impl_options(config, impl)
    fn = (lambda q, c, impl=impl, options=options:
          da.decode_attention(q, c, c.lengths, impl=impl, **options))
    try:
      timers[impl, bits] = attention_timer(config, fn, q[:, 0], caches[bits])
    except Exception as e:  # noqa: BLE001 - recorded in the row
      errors[impl, bits] = error_text(e)
  times, failed = interleaved_rounds(timers, config.rounds)
  errors.update(failed)
  ms = {name: statistics.median(t) if t and name not in errors else None
        for name, t in times.items()}
  cudnn, cudnn_rounds = ms.get("cudnn"), times.get("cudnn", [])
  for impl in ("cudnn", "xla"):
    print(f"B={batch:<3} S={seq_len:<7} {impl+'_bf16':>12}: "
          f"{ms.get(impl)} ms {times.get(impl, [])}")
    if impl not in base_pending:
      continue
    writer.write(dict(
        op="decode_attention", impl=f"{impl}_bf16", batch=batch,
        seq_len=seq_len, q_heads=hq, kv_heads=hkv, head_dim=d, key_bits=16,
        value_bits=16, time_ms=ms.get(impl),
        time_ms_rounds=times.get(impl, []), cudnn_bf16_ms=cudnn,
        cudnn_bf16_ms_rounds=cudnn_rounds, compressed_bytes=bf16_bytes,
        floor_ms=bf16_bytes / (config.bandwidth_tb_s * 1e9), device=device,
        error=errors.get(impl)))
  for impl, bits in pending:
    mem = cache_lib.memory(caches[bits])
    nbytes = mem["nbytes"] - mem["fixed_nbytes"]
    t, rounds = ms.get((impl, bits)), times.get((impl, bits), [])
    floor = nbytes / (config.bandwidth_tb_s * 1e9)
    paired = ([c / x for c, x in zip(cudnn_rounds, rounds)]
              if t and cudnn else [])
    writer.write(dict(
        op="decode_attention", impl=impl, batch=batch, seq_len=seq_len,
        q_heads=hq, kv_heads=hkv, head_dim=d, key_bits=bits,
        value_bits=bits, time_ms=t, time_ms_rounds=rounds,
        cudnn_bf16_ms=cudnn, cudnn_bf16_ms_rounds=cudnn_rounds,
        compressed_bytes=nbytes, floor_ms=floor,
        read_tb_s=(nbytes / t / 1e9) if t else None,
        speedup_vs_cudnn=(cudnn / t) if t and cudnn else None,
        speedup_rounds=paired,
        bits_per_coordinate=mem["bits_per_coordinate"],
        grid_centroids=caches[bits].config.grid_centroids,
        options=impl_options(config, impl), device=device,
        error=errors.get((impl, bits))))
    print(f"B={batch:<3} S={seq_len:<7} {impl:>12} bits={bits}: "
          f"{t if t is None else round(t, 3)} ms (floor {floor:.3f}, cudnn "
          f"{cudnn}) {[round(x, 2) for x in paired]} "
          f"{errors.get((impl, bits)) or ''}")


def write_table(workdir) -> pathlib.Path:
  """table.md from results.jsonl: decode attention per batch, then appends.

  Each cell is our time in ms and, in brackets, cuDNN bf16's time over ours
  (above 1 = faster than cuDNN), with cuDNN measured in the same run.
  """
  rows = results.read_rows(pathlib.Path(workdir) / results.RESULTS_FILE)
  attn = [r for r in rows if r["op"] == "decode_attention"]
  bits = sorted({r["key_bits"] for r in attn if r["key_bits"] != 16})
  device = next((r["device"] for r in rows), "?")
  lines = [f"# Decode attention and quantize-and-append on {device}", "",
           "ms per call (median of the rounds); in brackets cuDNN bf16 ms / "
           "ours (> 1: faster than cuDNN) and, with several rounds, its "
           "range over the rounds (cuDNN and ours timed in turn). floor = "
           "compressed bytes / 4.6 TB/s.", ""]
  for batch in sorted({r["batch"] for r in attn}):
    sub = [r for r in attn if r["batch"] == batch]
    head = ["S", "cuDNN bf16", "XLA bf16"]
    for b in bits:
      head += [f"TQ {b:g}-bit pallas_gpu", f"floor {b:g}"]
    lines += [f"## B = {batch}", "", "| " + " | ".join(head) + " |",
              "|" + "---:|" * len(head)]
    for seq in sorted({r["seq_len"] for r in sub}):
      at = {(r["impl"], r["key_bits"]): r for r in sub
            if r["seq_len"] == seq}
      def ms(r):
        return "-" if r is None or r["time_ms"] is None else (
            f"{r['time_ms']:.3f}")
      cells = [f"{seq // 1024}k", ms(at.get(("cudnn_bf16", 16))),
               ms(at.get(("xla_bf16", 16)))]
      for b in bits:
        r = at.get(("pallas_gpu", b))
        cell = ms(r)
        if r is not None and r.get("speedup_vs_cudnn"):
          paired = r.get("speedup_rounds") or []
          spread = (f", {min(paired):.2f}-{max(paired):.2f}"
                    if len(paired) > 1 else "")
          cell += f" ({r['speedup_vs_cudnn']:.2f}x{spread})"
        cells += [cell, "-" if r is None else f"{r['floor_ms']:.3f}"]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  app_rows = [r for r in rows if r["op"] == "quantize_append"]
  if app_rows:
    lines += ["## Quantize-and-append into a cache of "
              f"{app_rows[0]['capacity']} tokens, one layer", "",
              "| B | tokens | bits | impl | ms | tokens/s |",
              "|---:|---:|---:|---|---:|---:|"]
    for r in sorted(app_rows, key=lambda r: (r["batch"], r["tokens"],
                                             r["key_bits"], r["impl"])):
      lines.append(f"| {r['batch']} | {r['tokens']} | {r['key_bits']:g} | "
                   f"{r['impl']} | {r['time_ms']:.3f} | "
                   f"{r['tokens_per_s']:,.0f} |")
    lines.append("")
  quant_rows = [r for r in rows if r["op"] == "quantize_vectors"]
  if quant_rows:
    lines += ["## Quantize vectors (rotate, quantize, pack; XLA)", "",
              "| n | dim | bits | ms |", "|---:|---:|---:|---:|"]
    for r in sorted(quant_rows, key=lambda r: (r["dim"], r["key_bits"])):
      lines.append(f"| {r['n']:,} | {r['dim']} | {r['key_bits']:g} | "
                   f"{r['time_ms']:.3f} |")
    lines.append("")
  path = pathlib.Path(workdir) / "table.md"
  results.atomic_write(path, "\n".join(lines))
  return path


if __name__ == "__main__":
  define_flags()
  app.run(main)

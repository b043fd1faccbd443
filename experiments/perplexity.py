r"""Teacher-forced perplexity through the compressed KV cache (issue #4).

  python -m turboquant_jax.data.fetch      # Austen + SmolLM2, once
  python -m experiments.perplexity --config=configs/perplexity.py \
      --workdir=results/perplexity/cpu

Protocol. The text's first N·L tokens (no BOS) are cut into N consecutive
sequences of L tokens, run as one batch; each layer gets a cache of
capacity L built from the cache configuration (the same rotation seed for
every configuration). Then, per sequence:
1. Tokens 0..P-1 (P = config.prefill) enter through `model.prefill`, as a
   prompt would: the cache's prefill stores them (and fixes what a cache
   derives from the prompt: the outlier channels of fractional widths, the
   key mean of centered keys), then their queries attend over the cache,
   so their logits too are read through the compressed cache.
2. Every later token t = P..L-1 is appended to the cache (quantized, as at
   generation) and its logits come from attention over the cache holding
   tokens 0..t, every one read through the compressed representation except
   what the configuration keeps in full precision (a window of the last W
   tokens relative to t; KIVI's incomplete key group).
The logits at position t score token t+1, for t = 0..L-2: N·(L-1) tokens;
ppl = exp(mean NLL). Token-by-token decoding (a jitted lax.scan over
decode steps, `config.decode_segment` steps per call) is the ground truth.

Exact fast path. Step 2 runs as chunks of many tokens through the same
model call where that is exactly what decoding computes: every layer's
cache is "full" or TurboQuant without a window (a sink or 8-bit norms
are fine). There each appended token
is quantized on its own (integer widths; fractional widths after the
prefill fixed their outlier channels and key mean), so query t of a chunk
sees exactly the codes it would see at decode time, in exact arithmetic
(tests/experiments/perplexity_test.py checks it against decoding on a
tiny model). It is not bit for bit: a chunk's projections are [B, T, D]
matmuls instead of [B, 1, D] ones, and their last-ulp differences move a
few coordinates across a decision threshold; in a 30-layer model such
flips cascade (SmolLM2, 4 bits: 1e-6 of layer 1's codes differ, 20-30% of
layer 20's), so per-token NLLs differ while the perplexity moves by a few
tenths of a percent, like any float perturbation (chunks of 128 tokens
against one chunk do the same). `config.decode_checks` reruns some caches
token by token and `config.seed_checks` with other rotation seeds, to
show the size of this noise beside the table. The chunked path is not
exact for KIVI (a key group completed inside a chunk would be read
quantized by earlier queries of the chunk) nor for a window (it is
relative to the current length): those decode token by token.

Memory: bytes_per_token sums `cache.memory` over layers: everything stored
per token (codes, norms, QJL signs, KIVI's min/scale; the window ring,
KIVI's residual rings, the key mean and lengths amortized over the
capacity L); bits_per_
coordinate = bytes_per_token·8 / (2·kv_heads·head_dim·layers). A window's
share shrinks with L. Quantizer matrices, codebooks and outlier indices do
not grow with the cache and are in fixed_bytes.

Outputs in --workdir: config.json, results.jsonl (one row per work item:
each cache configuration, plus the noise checks, whose ids carry
"@seed<k>" or "@decode" and whose rows have main=false),
arrays/nll_<id>.npy (per-token NLL, [N, L-1]), table.md and
ppl_vs_bits.png. A re-run with the same workdir and config
skips the rows already written and redraws the table and plot.
"""

import math
import os
import pathlib
import time

from absl import app
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from experiments import common
from turboquant_jax import cache as cache_lib
from turboquant_jax import model as model_lib
from turboquant_jax import results

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 weights dequantized)"
TINY_NAME = "tiny random model (tests)"
ROW_KEY = ("id",)
TABLE_FILE = "table.md"
PLOT_FILE = "ppl_vs_bits.png"
# Bits per coordinate are compared at this resolution: the int32 lengths
# add 0.0024 bits per coordinate to every cache (SmolLM2, L = 1024).
BITS_TOLERANCE = 0.005
_CACHE_FIELDS = ("kind", "key_bits", "value_bits", "key_method",
                 "norm_correction", "window", "center_keys", "center_skip",
                 "dtype", "key_norm_bits", "value_norm_bits", "sink",
                 "grid_centroids")


# ------------------------------------------------------------------ inputs


def tiny_model_config() -> model_lib.ModelConfig:
  """The tests' model: 3 layers, GQA 2:1, head dim 32."""
  return model_lib.ModelConfig(vocab_size=97, d_model=64, n_layers=3,
                               n_heads=4, n_kv_heads=2, head_dim=32,
                               ffn_dim=96, max_seq_len=4096)


def load_model_and_tokens(config):
  """(model, tokens i32[N, L], model name, text name) for config.model."""
  n, length = config.num_sequences, config.sequence_length
  if config.model == "tiny":
    mc = tiny_model_config()
    model = model_lib.Transformer(mc, rngs=nnx.Rngs(config.seed))
    tokens = jax.random.randint(jax.random.key(config.seed + 1),
                                (n, length), 0, mc.vocab_size, jnp.int32)
    return model, np.asarray(tokens), TINY_NAME, "random tokens"
  if config.model != "smollm2":
    raise ValueError(f"config.model={config.model!r} must be 'smollm2' or "
                     "'tiny'")
  # pylint: disable=g-import-not-at-top
  from turboquant_jax.data import austen
  from turboquant_jax.data import smollm2
  # pylint: enable=g-import-not-at-top
  gguf_model = smollm2.load_smollm2()
  mc = model_lib.ModelConfig.from_hf_config(gguf_model.hf_config,
                                            dtype="float32")
  model = model_lib.from_hf_tensors(mc, gguf_model.weights)
  ids = gguf_model.tokenizer.encode(austen.load_book(config.text)).ids
  if len(ids) < n * length:
    raise ValueError(f"{config.text!r} has {len(ids)} tokens, fewer than "
                     f"{n} x {length}")
  tokens = np.asarray(ids[:n * length], np.int32).reshape(n, length)
  return model, tokens, SMOLLM2_NAME, config.text


# ------------------------------------------------------- cache configuration


layer_configs = common.layer_configs


def exact_chunks(configs) -> bool:
  """Whether chunked appends equal token-by-token decoding (module doc).

  A sink (the first tokens in full precision) keeps it exact: query t reads
  positions < sink from there in both. So do 8-bit norms, whose code range
  the (non-empty) prefill fixes.
  """
  return all(c.kind == "full" or (c.kind == "turboquant" and c.window == 0)
             for c in configs)


def _bits(fields) -> str:
  k, v = fields["key_bits"], fields["value_bits"]
  return f"{k:g}" if k == v else f"K{k:g}/V{v:g}"


def describe(spec) -> str:
  """A one-line human description of a config.caches entry."""
  def one(f):
    if f["kind"] == "full":
      return f"full precision ({f.get('dtype', 'bfloat16')})"
    if f["kind"] == "kivi":
      text = f"KIVI {_bits(f)}-bit (group 32)"
    else:
      text = (f"TurboQuant_{f.get('key_method', 'mse')} keys" if
              f.get("key_method", "mse") == "prod" else "TurboQuant")
      text += f" {_bits(f)}-bit"
      text += (", norm corr." if f.get("norm_correction", True)
               else ", no norm corr.")
      if f.get("center_keys"):
        text += ", centered keys"
        if f.get("center_skip"):
          text += f" (mean without the first {f['center_skip']})"
    eight = [t for t in ("key", "value") if f.get(f"{t}_norm_bits", 16) == 8]
    if eight:
      text += (", 8-bit log norms" if len(eight) == 2
               else f", 8-bit log {eight[0]} norms")
    if f.get("grid_centroids"):
      text += ", grid codebooks"
    if f.get("sink"):
      text += f", first {f['sink']} tokens fp (sink)"
    if f.get("window"):
      text += f", {f['window']}-token fp window"
    return text
  text = one(spec)
  if spec["edge_layers"]:
    text += (f"; first/last {spec['edge_layers']} layer(s): "
             f"{one(spec['edge'])}")
  return text


# -------------------------------------------------------------- evaluation


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target): logits f32[B, T, V], targets i32[B, T] -> f32[B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@jax.jit(static_argnames=("impl",))
def _prefill_nll(model, tokens, targets, caches, impl=None):
  lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
  logits, caches = model.prefill(tokens, caches, lengths, impl=impl)
  return _nll(logits, targets), caches


@jax.jit(static_argnames=("impl",))
def _chunk_nll(model, tokens, targets, caches, lengths_before, impl=None):
  logits, caches = model(tokens, caches, lengths_before, impl=impl)
  return _nll(logits, targets), caches


@jax.jit(static_argnames=("steps", "impl"))
def _decode_nll(model, tokens, targets, caches, start, steps, impl=None):
  """`steps` decode steps from position `start`: f32[B, steps] NLL."""
  batch = tokens.shape[0]

  def step(caches, i):
    t = start + i
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    target = jax.lax.dynamic_slice_in_dim(targets, t, 1, axis=1)
    logits, caches = model(token, caches, jnp.full((batch,), t, jnp.int32),
                           impl=impl)
    return caches, _nll(logits, target)[:, 0]

  caches, nll = jax.lax.scan(step, caches, jnp.arange(steps))
  return nll.T, caches


def evaluate(model, tokens, configs, *, prefill: int, path: str = "auto",
             chunk: int = 0, decode_segment: int = 32,
             key: jax.Array | None = None, impl: str | None = None):
  """Per-token NLL of tokens [N, L] read through caches of `configs`.

  Args:
    model: a Transformer.
    tokens: i32[N, L].
    configs: one CacheConfig per layer.
    prefill: tokens that enter through model.prefill (>= 1).
    path: "auto" (chunked where exact, else decode), "chunk" (chunked even
      where not exact; for tests only) or "decode".
    chunk: tokens per chunk on the chunked path (0: all at once).
    decode_segment: decode steps per jitted scan call.
    key: the rotations' key (init_caches).
    impl: the attention implementation (None: the best for the backend).

  Returns:
    (nll f32[N, L-1] (nll[:, t] scores token t+1 from the logits at t), the
    final caches, the path taken).
  """
  n, length = tokens.shape
  if not 1 <= prefill <= length:
    raise ValueError(f"{prefill=} must be in [1, {length}]")
  if path == "auto":
    path = "chunk" if exact_chunks(configs) else "decode"
  if path not in ("chunk", "decode"):
    raise ValueError(f"{path=!r} must be 'auto', 'chunk' or 'decode'")
  tokens = jnp.asarray(tokens, jnp.int32)
  # The target of the last position is a dummy (dropped below).
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  caches = model.init_caches(n, length, configs, key)
  nll, caches = _prefill_nll(model, tokens[:, :prefill],
                             targets[:, :prefill], caches, impl=impl)
  parts = [nll]
  start = prefill
  while start < length:
    if path == "chunk":
      stop = length if chunk <= 0 else min(start + chunk, length)
      nll, caches = _chunk_nll(model, tokens[:, start:stop],
                               targets[:, start:stop], caches,
                               jnp.full((n,), start, jnp.int32), impl=impl)
    else:
      stop = min(start + decode_segment, length)
      nll, caches = _decode_nll(model, tokens, targets, caches,
                                jnp.int32(start), steps=stop - start,
                                impl=impl)
    parts.append(nll)
    start = stop
  nll = np.asarray(jax.device_get(jnp.concatenate(parts, axis=1)),
                   np.float64)
  return nll[:, :length - 1], caches, path


def cache_memory(caches, model_config) -> dict[str, float]:
  """Memory summed over layers (see the module docstring)."""
  per_layer = [cache_lib.memory(c) for c in caches]
  per_token = sum(m["bytes_per_token"] for m in per_layer)
  coords = 2 * model_config.n_kv_heads * model_config.head_dim * len(caches)
  return dict(bytes_per_token=per_token,
              bits_per_coordinate=per_token * 8 / coords,
              fixed_bytes=sum(m["fixed_nbytes"] for m in per_layer))


# ------------------------------------------------------------------- run


def _arrays_path(workdir: pathlib.Path, item_id: str) -> pathlib.Path:
  return workdir / "arrays" / f"nll_{item_id}.npy"


def _save_nll(path: pathlib.Path, nll: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
  np.save(tmp, nll.astype(np.float32))
  os.replace(tmp, path)


def item_id(name: str, seed: int, path: str, config) -> str:
  """A work item's id: the cache name, plus what differs from the main run."""
  out = name
  if seed != config.seed:
    out += f"@seed{seed}"
  if path != config.path:
    out += f"@{path}"
  return out


def work_items(config) -> list[tuple[dict, int, str]]:
  """(cache entry, seed, requested path): the main sweep, the reference
  first, then the noise checks (other seeds; forced decoding)."""
  specs = {s["name"]: dict(s) for s in config.caches}
  if len(specs) != len(config.caches):
    names = [s["name"] for s in config.caches]
    raise ValueError(f"cache names repeat: {names}")
  only = [x for x in str(config.only).split(",") if x]
  wanted = list(config.seed_checks) + list(config.decode_checks) + only
  if unknown := sorted(set(wanted) - set(specs)):
    raise ValueError(f"config names unknown caches {unknown}")
  if config.reference not in specs:
    raise ValueError(f"{config.reference=!r} is not a cache name")
  names = [n for n in specs if not only or n in only]
  names.sort(key=lambda n: n != config.reference)      # the reference first
  items = [(specs[n], config.seed, config.path) for n in names]
  items += [(specs[n], seed, config.path) for n in config.seed_checks
            if n in names for seed in config.extra_seeds]
  items += [(specs[n], config.seed, "decode") for n in config.decode_checks
            if n in names]
  unique, seen = [], set()
  for spec, seed, path in items:
    key = item_id(spec["name"], seed, path, config)
    if key not in seen:
      seen.add(key)
      unique.append((spec, seed, path))
  return unique


def measure(model, tokens, spec, config, model_name: str, text: str, *,
            seed: int, path: str) -> tuple[dict, np.ndarray]:
  """Evaluates one cache configuration: (row without rel_to_full, nll)."""
  configs = layer_configs(model.config, spec)
  start = time.perf_counter()
  nll, caches, taken = evaluate(
      model, tokens, configs, prefill=config.prefill, path=path,
      chunk=config.chunk, decode_segment=config.decode_segment,
      key=jax.random.key(seed), impl=config.attention_impl or None)
  seconds = time.perf_counter() - start
  mem = cache_memory(caches, model.config)
  mean = float(nll.mean())
  row = dict(
      model=model_name, text=text, cache=spec["name"],
      id=item_id(spec["name"], seed, path, config),
      main=seed == config.seed and path == config.path,
      group=spec["group"], description=describe(spec),
      **{f: spec.get(f, 0) for f in _CACHE_FIELDS},
      edge_layers=spec["edge_layers"],
      edge=describe(dict(spec["edge"], edge_layers=0))
      if spec["edge_layers"] else None,
      seed=seed, path_requested=path, path=taken, prefill=config.prefill,
      bits_per_coordinate=mem["bits_per_coordinate"],
      bytes_per_token=mem["bytes_per_token"],
      fixed_bytes=mem["fixed_bytes"],
      num_sequences=tokens.shape[0], sequence_length=tokens.shape[1],
      tokens=int(nll.size), nll=mean, ppl=math.exp(mean),
      ppl_per_sequence=[math.exp(x) for x in nll.mean(axis=1)],
      seconds=seconds)
  return row, nll


def run(config, workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Runs (or resumes) the experiment into workdir; returns output paths."""
  workdir = pathlib.Path(workdir)
  writer = results.Writer(workdir, config)
  env = results.environment()
  logging.info("environment: %s", env)
  items = work_items(config)
  done = {k[0] for k in writer.done_keys(ROW_KEY)}
  todo = [it for it in items
          if item_id(it[0]["name"], it[1], it[2], config) not in done]
  logging.info("%d of %d work items to do", len(todo), len(items))
  if todo:
    model, tokens, model_name, text = load_model_and_tokens(config)
    ref_id = item_id(config.reference, config.seed, config.path, config)
    ref_nll = None
    if (ref_path := _arrays_path(workdir, ref_id)).is_file():
      ref_nll = np.load(ref_path).astype(np.float64)
    for spec, seed, path in todo:
      name = item_id(spec["name"], seed, path, config)
      logging.info("%s: %s", name, describe(spec))
      row, nll = measure(model, tokens, spec, config, model_name, text,
                         seed=seed, path=path)
      if name == ref_id:
        ref_nll = nll
      if ref_nll is not None:
        row["rel_to_full"] = row["ppl"] / math.exp(ref_nll.mean()) - 1
        diff = (nll - ref_nll).ravel()
        # Paired, over tokens (which are correlated: indicative only).
        row["nll_diff_se"] = float(diff.std(ddof=1) / math.sqrt(diff.size))
      row["environment"] = env
      _save_nll(_arrays_path(workdir, name), nll)
      writer.write(row)
      logging.info("%s: ppl %.3f (%+.2f%%), %.3f bits/coord, %s path, "
                   "%.1f s", name, row["ppl"],
                   100 * row.get("rel_to_full", math.nan),
                   row["bits_per_coordinate"], row["path"], row["seconds"])
  return make_outputs(workdir, config)


# --------------------------------------------------------------- outputs


def best_per_budget(rows, budgets) -> list[dict]:
  """For each budget: the lowest-ppl TurboQuant and KIVI rows within it.

  Keys-only / values-only ablations (the other side at 8 bits) compete
  like any configuration: they are real caches with their real bits.
  """
  out = []
  for budget in budgets:
    entry = dict(budget=budget)
    for label, pick in (("turboquant", lambda r: r["kind"] == "turboquant"),
                        ("kivi", lambda r: r["kind"] == "kivi")):
      fits = [r for r in rows if pick(r)
              and r["bits_per_coordinate"] <= budget + BITS_TOLERANCE]
      entry[label] = min(fits, key=lambda r: r["ppl"]) if fits else None
    out.append(entry)
  return out


def targets(rows, reference_ppl: float) -> dict:
  """The issue's two targets, evaluated on the rows."""
  tq = [r for r in rows if r["kind"] == "turboquant"]
  kivi = [r for r in rows if r["kind"] == "kivi"]
  versus = []
  for k in sorted(kivi, key=lambda r: r["bits_per_coordinate"]):
    if not (3.0 - BITS_TOLERANCE <= k["bits_per_coordinate"]
            <= 5.5 + BITS_TOLERANCE):
      continue
    fits = [r for r in tq if r["bits_per_coordinate"]
            <= k["bits_per_coordinate"] + BITS_TOLERANCE]
    best = min(fits, key=lambda r: r["ppl"]) if fits else None
    versus.append(dict(kivi=k, turboquant=best,
                       beats=bool(best and best["ppl"] < k["ppl"])))
  within = [r for r in tq if r["ppl"] <= 1.01 * reference_ppl]
  cheapest = (min(within, key=lambda r: r["bits_per_coordinate"])
              if within else None)
  return dict(versus_kivi=versus,
              beats_kivi=bool(versus) and all(v["beats"] for v in versus),
              cheapest_within_1pct=cheapest,
              within_1pct_at_4_7=bool(cheapest) and
              cheapest["bits_per_coordinate"] <= 4.7 + BITS_TOLERANCE)


def _fmt_row(r, ref_ppl) -> str:
  rel = r["ppl"] / ref_ppl - 1 if ref_ppl else math.nan
  return (f"| `{r['cache']}` | {r['description']} | "
          f"{r['bits_per_coordinate']:.3f} | {r['ppl']:.3f} | "
          f"{100 * rel:+.2f}% | {r['path']} | {r['seconds']:.0f} |")


_HEADER = ("| cache | configuration | bits/coord | ppl | vs full | path | "
           "s |\n|---|---|---:|---:|---:|---|---:|")


def noise_lines(rows) -> list[str]:
  """Markdown on the noise checks: other rotation seeds, forced decoding."""
  main = {r["cache"]: r for r in rows if r.get("main", True)}
  extra = [r for r in rows if not r.get("main", True)]
  lines = []
  for name in dict.fromkeys(r["cache"] for r in extra):
    base = main.get(name)
    seeds = [r for r in extra if r["cache"] == name
             and r["path_requested"] == (base or r)["path_requested"]]
    decoded = [r for r in extra if r["cache"] == name
               and r["path_requested"] == "decode"]
    if seeds and base:
      ppls = [base["ppl"]] + [r["ppl"] for r in seeds]
      sd = float(np.std(ppls, ddof=1))
      lines.append(
          f"- `{name}` over rotation seeds "
          f"{[base['seed']] + [r['seed'] for r in seeds]}: ppl "
          f"{', '.join(f'{x:.3f}' for x in ppls)} (mean {np.mean(ppls):.3f},"
          f" sd {sd:.3f} = {100 * sd / np.mean(ppls):.2f}%).")
    for r in decoded:
      if base:
        lines.append(
            f"- `{name}` token by token (decode path): ppl {r['ppl']:.3f} "
            f"against {base['ppl']:.3f} on the {base['path']} path "
            f"({100 * (r['ppl'] / base['ppl'] - 1):+.2f}%).")
  return lines


def make_table(rows, config) -> str:
  """table.md: the paper's setting, best per budget, targets, all rows."""
  all_rows = rows
  rows = [r for r in rows if r.get("main", True)]
  by_name = {r["cache"]: r for r in rows}
  ref = by_name.get(config.reference)
  ref_ppl = ref["ppl"] if ref else None
  first = rows[0]
  lines = [
      "# Perplexity through the compressed KV cache",
      "",
      f"Model: {first['model']}; text: {first['text']}, "
      f"{first['num_sequences']} x {first['sequence_length']} tokens, "
      f"{first['tokens']} scored; the first {first['prefill']} tokens of "
      "each sequence are a prefill, every later one is appended and scored "
      "as at generation (see experiments/perplexity.py). bits/coord counts "
      "everything stored per token (codes, norms, windows and rings "
      "amortized over the sequence length, KIVI min/scale).",
      ""]
  if ref:
    lines += [f"Reference `{ref['cache']}`: ppl {ref_ppl:.3f} at "
              f"{ref['bits_per_coordinate']:.2f} bits/coord.", ""]
  sel = [r for r in rows if r["group"] in ("baseline", "paper", "kivi")]
  lines += ["## The paper's setting (no window, every token quantized), "
            "KIVI and the baselines", "", _HEADER]
  lines += [_fmt_row(r, ref_ppl)
            for r in sorted(sel, key=lambda r: r["bits_per_coordinate"])]
  lines += ["", "## Best configuration per bits-per-coordinate budget", "",
            "| budget | best TurboQuant | bits | ppl | vs full | best KIVI | "
            "bits | ppl | vs full |", "|---:|---|---:|---:|---:|---|---:|"
            "---:|---:|"]
  for e in best_per_budget(rows, config.budgets):
    cells = [f"{e['budget']:g}"]
    for label in ("turboquant", "kivi"):
      r = e[label]
      if r is None:
        cells += ["-", "", "", ""]
      else:
        rel = (f"{100 * (r['ppl'] / ref_ppl - 1):+.2f}%" if ref_ppl
               else "")
        cells += [f"`{r['cache']}`", f"{r['bits_per_coordinate']:.2f}",
                  f"{r['ppl']:.3f}", rel]
    lines.append("| " + " | ".join(cells) + " |")
  if ref_ppl:
    t = targets(rows, ref_ppl)
    lines += ["", "## Targets", ""]
    for v in t["versus_kivi"]:
      k, q = v["kivi"], v["turboquant"]
      got = (f"best TurboQuant within its bits: `{q['cache']}` "
             f"({q['bits_per_coordinate']:.2f} bits, ppl {q['ppl']:.3f})"
             if q else "no TurboQuant configuration within its bits")
      lines.append(f"- `{k['cache']}` ({k['bits_per_coordinate']:.2f} bits, "
                   f"ppl {k['ppl']:.3f}): {got}: "
                   f"{'beaten' if v['beats'] else 'NOT beaten'}.")
    c = t["cheapest_within_1pct"]
    lines.append(
        "- Within 1% of the reference: " +
        (f"cheapest `{c['cache']}` at {c['bits_per_coordinate']:.2f} "
         f"bits/coord (ppl {c['ppl']:.3f}): target (<= 4.7) "
         f"{'met' if t['within_1pct_at_4_7'] else 'NOT met'}."
         if c else "no TurboQuant configuration: target NOT met."))
  if noise := noise_lines(all_rows):
    lines += ["", "## Noise checks", ""] + noise
  lines += ["", "## Every configuration", "", _HEADER]
  lines += [_fmt_row(r, ref_ppl)
            for r in sorted(rows, key=lambda r: (r["kind"],
                                                 r["bits_per_coordinate"]))]
  return "\n".join(lines) + "\n"


def make_plot(rows, config, path: pathlib.Path) -> None:
  """Perplexity increase over the reference against bits per coordinate."""
  rows = [r for r in rows if r.get("main", True)]
  ref = next((r for r in rows if r["cache"] == config.reference), None)
  if ref is None:
    return
  rel = lambda r: 100 * (r["ppl"] / ref["ppl"] - 1)
  fig, ax = plt.subplots(figsize=(8, 5.5))
  styles = {"paper": ("tab:blue", "o", "TurboQuant, paper setting"),
            "ablation": ("tab:gray", "x", "keys-only / values-only (other "
                         "side 8-bit)"),
            "lever": ("tab:green", "s", "TurboQuant + levers"),
            "kivi": ("tab:red", "^", "KIVI")}
  for group, (color, marker, label) in styles.items():
    sel = [r for r in rows if r["group"] == group and rel(r) > 0]
    if not sel:
      continue
    ax.scatter([r["bits_per_coordinate"] for r in sel], [rel(r) for r in sel],
               c=color, marker=marker, label=label, zorder=3)
    for r in sel:
      ax.annotate(r["cache"], (r["bits_per_coordinate"], rel(r)),
                  fontsize=6, xytext=(3, 2), textcoords="offset points")
  tq = sorted((r for r in rows if r["kind"] == "turboquant" and rel(r) > 0),
              key=lambda r: r["bits_per_coordinate"])
  front, best = [], math.inf
  for r in tq:
    if r["ppl"] < best:
      best = r["ppl"]
      front.append(r)
  if front:
    xs = [r["bits_per_coordinate"] for r in front] + [6.5]
    ys = [rel(r) for r in front] + [rel(front[-1])]
    ax.step(xs, ys, where="post", c="tab:green", alpha=0.5,
            label="best TurboQuant within the bits")
  ax.axhline(1.0, c="k", ls=":", lw=1, label="+1%")
  ax.set_yscale("log")
  ax.set_xlim(2, 6.5)
  ax.set_xlabel("bits per coordinate (everything stored)")
  ax.set_ylabel(f"perplexity increase over {ref['cache']} "
                f"(ppl {ref['ppl']:.2f}), %")
  first = rows[0]
  ax.set_title(f"{first['model'].split(' (')[0]} on {first['text']}, "
               f"{first['tokens']} tokens", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def make_outputs(workdir: pathlib.Path, config) -> list[pathlib.Path]:
  """Writes table.md and the plot from results.jsonl."""
  rows = results.read_rows(workdir / results.RESULTS_FILE)
  if not rows:
    return []
  table = workdir / TABLE_FILE
  table.write_text(make_table(rows, config), encoding="utf-8")
  plot = workdir / PLOT_FILE
  make_plot(rows, config, plot)
  return [workdir / results.CONFIG_FILE, workdir / results.RESULTS_FILE,
          table, plot]


if __name__ == "__main__":
  common.define_flags("perplexity.py")
  app.run(common.main_for(run))

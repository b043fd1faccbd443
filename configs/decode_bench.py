"""Decode tokens/s of a SmolLM2-shaped model over full vs compressed caches.

    python -m experiments.decode_bench --config=configs/decode_bench.py

`--config=configs/decode_bench.py:model=llama3_8b` (GPU): a Llama-3.1-8B-
shaped model (head dim 128, 32 / 8 heads) at B = 8 over 32k cached tokens,
where the full bf16 cache (34 GB) outweighs the weights (16 GB).
`caches=cudnn-bf16+tq4` (any scale) keeps only the named rows of `caches`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = dict(a.split("=", 1) for a in (arg or "").split(",") if a)
  scale = args.get("scale", "full")
  c = ml_collections.ConfigDict()
  c.model = args.get("model", "smollm2")   # decode_bench.MODELS
  c.seed = 0
  c.batches = (1, 32)
  c.context = 8192                      # tokens already cached
  c.capacity = 9216                     # a multiple of 64 * 16 splits
  # (name, kind, key_bits, value_bits, impl, append_impl[, options]): impl
  # (of the attention) None = best available; append_impl = CacheConfig's;
  # options: a dict of more CacheConfig fields (rows: cache_options).
  # tq4, tq3: the defaults ("auto": append and attention in one launch
  # up to 64 sequence-heads, so at B=1 here, two launches at B=32).
  c.caches = (("full-bf16", "full", 16, 16, "xla", "xla"),
              ("tq4", "turboquant", 4, 4, None, "auto"),
              ("tq4-xla", "turboquant", 4, 4, "xla", "xla"),
              ("tq3", "turboquant", 3, 3, None, "auto"),
              # GPU only: one launch (fused) or two (the append kernel's
              # and the attention's) at every batch size.
              ("tq4-fused", "turboquant", 4, 4, None, "fused"),
              ("tq4-two-launches", "turboquant", 4, 4, None, "pallas_gpu"),
              # GPU only: cuDNN over the full cache in place (first run in
              # h200_v7); the append left to XLA (the default before v8).
              ("full-bf16-cudnn", "full", 16, 16, "cudnn", "xla"),
              ("tq4-xla-append", "turboquant", 4, 4, None, "xla"),
              # The outlier split (parts of 32 at this head dim, 64): as tq4
              # (append and attention in one launch at B=1, the append
              # kernel's and the attention's at B=32; session 21).
              ("tq2.5", "turboquant", 2.5, 2.5, None, "auto"),
              ("tq3.5", "turboquant", 3.5, 3.5, None, "auto"))
  c.steps_per_call = 32                 # decode steps in one jitted loop
  c.unroll = False                      # the loop's steps written out
  c.warmup = 2
  c.rounds = 5                          # interleaved: every cache each round
  c.reps = 6                            # timed calls per cache and round
  if c.model == "llama3_8b":
    # 16 GB of bf16 weights and, at B = 8, 32768 tokens, 34 GB of full bf16
    # cache (1.07 GB a layer), 9 GB at 4 bits: every cache is held at once.
    c.batches = (8,)
    c.context = 32768
    c.capacity = 33792
    c.caches = (("cudnn-bf16", "full", 16, 16, "cudnn", "xla"),
                ("tq4", "turboquant", 4, 4, None, "auto"),
                ("tq3", "turboquant", 3, 3, None, "auto"),
                ("tq2.5", "turboquant", 2.5, 2.5, None, "auto"),
                # Codebooks on the grid (CacheConfig.grid_centroids): the
                # kernel's faster 4-bit lookup.
                ("tq4-grid", "turboquant", 4, 4, None, "auto",
                 {"grid_centroids": True}))
    c.steps_per_call = 8
    c.rounds = 3
    c.reps = 3
  if scale == "cpu":
    if c.model != "smollm2":
      raise ValueError(f"scale=cpu runs model=smollm2 only, not {c.model}")
    c.caches = c.caches[:4]             # the others need a GPU
    c.batches = (1,)
    c.context = 192
    c.capacity = 256
    c.rounds = 2
    c.reps = 1
    c.warmup = 1
    c.steps_per_call = 4
  elif scale != "full":
    raise ValueError(f"scale={scale!r} must be full or cpu")
  if "caches" in args:
    names = args["caches"].split("+")
    known = [spec[0] for spec in c.caches]
    unknown = [n for n in names if n not in known]
    if unknown:
      raise ValueError(f"caches={args['caches']!r}: {unknown} not among "
                       f"this config's caches {known}")
    c.caches = tuple(spec for spec in c.caches if spec[0] in names)
  return c

"""Decode-attention benchmark sweep (issue: fused kernels vs cuDNN bf16).

    python -m experiments.kernel_bench --config=configs/kernel_bench.py
    python -m experiments.kernel_bench --config=configs/kernel_bench.py:scale=quick
    (scale=kernel: decode attention of impl="pallas_gpu" at B = 8 only;
    kernel options: --config.pallas_gpu.lookup_mode=prmt and the like;
    --config.grid_centroids=True: caches with grid codebooks)
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = dict(a.split("=", 1) for a in (arg or "").split(",") if a)
  scale = args.get("scale", "full")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.q_heads = 32
  c.kv_heads = 8
  c.head_dim = 128
  c.batches = (1, 8, 32)
  c.seq_lens = (4096, 16384, 32768, 65536, 131072)
  c.bits = (2, 3, 4, 2.5, 3.5)          # keys and values alike
  c.grid_centroids = False              # CacheConfig.grid_centroids (rows
                                        # record it)
  c.impls = ("pallas_gpu", "xla")       # ours; cudnn/xla bf16 always run
  # Options of impl="pallas_gpu" (pallas_gpu.attention's keywords, set to
  # its defaults: benchmarks_test checks), recorded in each row's
  # `options`.
  c.pallas_gpu = ml_collections.ConfigDict(dict(
      layout="tokens", lookup_mode="prmt", key_registers=True,
      transpose_p=True, skip_empty_splits=True, approx_math=True,
      overlap_values=ml_collections.config_dict.placeholder(bool),
      rotate_in_kernel=ml_collections.config_dict.placeholder(bool),
      min_columns=ml_collections.config_dict.placeholder(int),
      auto_barriers=ml_collections.config_dict.placeholder(bool),
      tma_row_bytes=ml_collections.config_dict.placeholder(int),
      tile_rows=ml_collections.config_dict.placeholder(int),
      stages=ml_collections.config_dict.placeholder(int)))
  c.max_xla_bytes = 8 * 2**30           # skip impl="xla" (it materializes
                                        # f32 K/V) when that would exceed this
  c.warmup = 3
  c.reps = 20
  c.loops = 20                          # decode-attention calls per timed
                                        # jitted loop (device time; 0: one
                                        # call per timing, wall clock)
  c.unroll = True                       # the loop's calls written out
                                        # (no while loop at run time)
  c.gpu_timer = True                    # each run's span on the GPU from
                                        # a profiler trace, not wall clock
  c.rounds = 3                          # interleaved rounds per (B, S):
                                        # cuDNN, XLA bf16 and every width
                                        # timed in turn, rounds times
  c.check = True                        # compare against the reference on
                                        # a small cache first
  c.bandwidth_tb_s = 4.6                # practical HBM ceiling for the floor
  # Quantize-and-append (rotate, quantize, pack, write) into a cache of
  # append_capacity tokens: decode (1 token) and a prefill chunk.
  c.append_batches = (1, 8, 32)
  c.append_capacity = 32768
  c.append_tokens = (1, 4096)
  c.append_impls = ("xla", "pallas_gpu")  # pallas_gpu: one token only
  # The paper's Table 2: quantize 100k vectors at 4 bits.
  c.quantize_dims = (200, 1536, 3072)
  c.quantize_n = 100_000
  if scale == "quick":
    c.batches = (8,)
    c.seq_lens = (16384, 131072)
    c.bits = (4, 3)
    c.reps = 10
    c.append_batches = (8,)
  elif scale == "kernel":               # the kernel at B = 8 only
    c.batches = (8,)
    c.impls = ("pallas_gpu",)
    c.append_batches = ()
    c.quantize_dims = ()
  elif scale == "cpu":                  # a smoke run on the CPU
    c.batches = (1,)
    c.seq_lens = (512,)
    c.bits = (4,)
    c.q_heads, c.kv_heads = 4, 2
    c.impls = ("xla",)
    c.reps = 2
    c.warmup = 1
    c.loops = 2
    c.gpu_timer = False                 # no GPU kernels to trace
    c.rounds = 2
    c.append_batches = (1,)
    c.append_capacity = 256
    c.append_tokens = (1, 16)
    c.append_impls = ("xla",)
    c.quantize_dims = (64,)
    c.quantize_n = 1000
  elif scale == "check":                # correctness only, no timing
    c.batches = ()
    c.bits = (4, 3, 2, 2.5, 3.5)
    c.impls = ("pallas_gpu",)
    c.append_batches = ()
    c.quantize_dims = ()
  elif scale != "full":
    raise ValueError(f"scale={scale!r} must be full, quick, check or cpu")
  return c

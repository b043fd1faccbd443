"""impl="pallas_gpu": fused attention over packed TurboQuant codes, Mosaic GPU.

Version 2: tensor cores for both products, the FlashAttention layout.

Grid (B, K, NS) over sequences, KV heads and sequence splits; one warpgroup
per program. A TMA pipeline streams tiles of 64 tokens of packed key and
value codes and their norms into SMEM. Per tile, the warpgroup

1. unpacks the key codes (shift + mask per contiguous coordinate chunk),
   maps them to centroids (an odd polynomial through the codebook, or a
   select chain) and stores them as f16 chunks [64 tokens, Dc] in swizzled
   SMEM; the codes never exist as a full bf16/f16 K in HBM;
2. scores all M = T·G queries of the GQA group at once on the tensor cores:
   S[64 rows, 64 tokens] = Σ_chunks Q_chunk · K_chunkᵀ (wgmma, f32
   accumulation; query rows past M are zero padding), scaled by the key
   norms per token column;
3. keeps an online softmax per query row (row reductions stay inside a
   warp, as in FlashAttention);
4. unpacks the value codes the same way and accumulates
   O_chunk += (P · value norms) · V_chunk (wgmma), in the rotated domain.

The query is rotated once before the kernel (<q, Rᵀy> = <Rq, y>) and each
value part is rotated back once after it (parts.finish), where the splits
are merged by log-sum-exp. QJL keys (prod) add a third kind of part: their
sign bits are 1-bit codes with centroids ±1, the sketched query S·q as its
query and the residual weight as its per-token norm.

Limits (NotImplementedError -> impl=None falls back to "xla"): every packed
row must be a multiple of 16 bytes (a TMA row), the capacity a multiple of
64 · NS, at most 64 query rows (T·G), part dims with 16-column chunks.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from turboquant_jax.kernels.decode_attention import parts

ROWS = 64      # tokens per tile = query rows of one warpgroup's wgmma

_L = plgpu.Layout


def _check(inp: parts.KernelInputs, splits: int) -> None:
  cap = inp.value_codes[0].shape[2]
  if cap % (ROWS * splits):
    raise NotImplementedError(f"capacity {cap} must be a multiple of "
                              f"{ROWS} * {splits=}")
  m = inp.q[0].shape[2]
  if m > ROWS:
    raise NotImplementedError(f"{m} query rows (T·G) per KV head; the "
                              f"kernel takes at most {ROWS}")
  codes = inp.key_codes + [s for s in inp.key_signs if s is not None]
  for c in codes + inp.value_codes:
    if c.shape[-1] % 16:
      raise NotImplementedError(
          f"pallas_gpu: packed row of {c.shape[-1]} bytes is not a multiple "
          "of 16 (a TMA row)")
  for spec in _kernel_specs(inp)[0] + list(inp.value_specs):
    if spec.dim % GROUP:
      raise NotImplementedError(f"pallas_gpu: part dim {spec.dim} is not a "
                                f"multiple of {GROUP}")


def _kernel_specs(inp: parts.KernelInputs):
  """Key parts as the kernel sees them: codebook parts, then sign parts."""
  specs, queries, codes, norms = [], [], [], []
  for spec, q, c, n in zip(inp.key_specs, inp.q, inp.key_codes,
                           inp.key_norms):
    if spec.bits:
      specs.append(spec)
      queries.append(q)
      codes.append(c)
      norms.append(n)
  for spec, sq, signs, coef in zip(inp.key_specs, inp.sq, inp.key_signs,
                                   inp.key_coef):
    if spec.prod:
      specs.append(parts.PartSpec(dim=spec.dim, bits=1,
                                  centroids=(-1.0, 1.0)))
      queries.append(sq)
      codes.append(signs)
      norms.append(coef)
  return specs, queries, codes, norms


# ------------------------------------------------------------ lookup


def odd_polynomial(centroids: tuple[float, ...]) -> tuple[float, ...] | None:
  """Coefficients a with centroids[c] = t·Σ_i a_i t^(2i), t = (2c+1-n)/(n-1).

  A symmetric codebook of n = 2^b values is an odd function of the centred
  code, so n/2 odd powers interpolate it exactly; for b <= 4 the f32
  Horner evaluation is accurate to ~1e-7 of the largest centroid (n/2 - 1
  FMAs against 2^b - 1 selects). None if the codebook is not symmetric or
  the f32 evaluation is off by more than 1e-6 (b >= 5: equispaced
  interpolation of high degree); the kernel then uses selects.
  """
  c = np.asarray(centroids, np.float64)
  n = len(c)
  if n < 2 or np.max(np.abs(c + c[::-1])) > 1e-6 * np.max(np.abs(c)):
    return None
  t = (2 * np.arange(n) + 1 - n) / (n - 1)
  half = n // 2
  basis = np.stack([t[half:] ** (2 * i + 1) for i in range(half)], axis=1)
  coef = np.linalg.solve(basis, c[half:])
  t32 = t.astype(np.float32)
  acc = np.full(n, coef[-1], np.float32)
  for a in coef[-2::-1]:
    acc = acc * (t32 * t32) + np.float32(a)
  if np.max(np.abs(acc * t32 - c)) > 1e-6 * np.max(np.abs(c)):
    return None
  return tuple(float(a) for a in coef)


def lookup(code: jax.Array, spec: parts.PartSpec, mode: str) -> jax.Array:
  """centroids[code] (f32) by an odd polynomial or a select chain."""
  coef = odd_polynomial(spec.centroids) if mode == "poly" else None
  if coef is None:
    return parts.lookup(code, spec.centroids)
  n = len(spec.centroids)
  t = code.astype(jnp.float32) * (2.0 / (n - 1)) + (1.0 - n) / (n - 1)
  t2 = t * t
  acc = jnp.full(code.shape, coef[-1], jnp.float32)
  for a in coef[-2::-1]:
    acc = acc * t2 + a
  return acc * t


# ------------------------------------------------------------ the kernel


GROUP = 64     # coordinates per SMEM operand tile (128-byte swizzled f16)


def _groups(spec: parts.PartSpec) -> int:
  return spec.dim // GROUP


def _group_smem(groups: int) -> plgpu.SMEM:
  """f16[groups, 64, 64] in the tiled, swizzled form wgmma reads."""
  return plgpu.SMEM(
      (groups, ROWS, GROUP), jnp.float16,
      transforms=(plgpu.TilingTransform((8, 64)),
                  plgpu.SwizzleTransform(128)))


def _in_groups(chunks: list[jax.Array]) -> list[jax.Array]:
  """Contiguous coordinate chunks [64, Dc] -> column groups [64, 64]."""
  dc = chunks[0].shape[1]
  if dc >= GROUP:
    return [c[:, o:o + GROUP] for c in chunks for o in range(0, dc, GROUP)]
  per = GROUP // dc
  return [jnp.concatenate(chunks[g:g + per], axis=1)
          for g in range(0, len(chunks), per)]


def _dequantize_into(code_ref, spec, smem, mode) -> None:
  """Unpacks a u8[64, P] tile and stores its centroids group by group."""
  words = plgpu.load(code_ref, layout=_L.WGMMA, optimized=False)
  words = words.astype(jnp.int32)
  chunks = [lookup(c, spec, mode)
            for c in parts.unpack_chunks(words, spec.bits, spec.dim)]
  for g, group in enumerate(_in_groups(chunks)):
    smem[g] = group.astype(jnp.float16)


def _kernel(qlen_ref, qend_ref, *refs, key_specs, value_specs, groups,
            split_len, kv_heads, splits, mode):
  nk, nv = len(key_specs), len(value_specs)
  q_refs = refs[:nk]                                  # [B·K·Dp/64, 64, 64]
  kc_refs = refs[nk:2 * nk]                           # [B, K, S, P]
  kn_refs = refs[2 * nk:3 * nk]                       # [B, K, S]
  vc_refs = refs[3 * nk:3 * nk + nv]
  vn_refs = refs[3 * nk + nv:3 * nk + 2 * nv]
  rest = refs[3 * nk + 2 * nv:]
  o_refs, ml_ref = rest[:nv], rest[nv]    # [B·K·NS·Dp/64, 64, 64], [.., 2, 64]
  scratch = rest[nv + 1:]
  q_smem = scratch[:nk]
  k_smem = scratch[nk:2 * nk]
  v_smem = scratch[2 * nk:2 * nk + nv]
  p_smem = scratch[2 * nk + nv:2 * nk + 2 * nv]
  o_smem = scratch[2 * nk + 2 * nv:2 * nk + 3 * nv]
  ml_smem, barrier = scratch[2 * nk + 3 * nv:]

  b = jax.lax.axis_index("b")
  k = jax.lax.axis_index("k")
  sp = jax.lax.axis_index("s")
  qlen = qlen_ref[b]
  qend = qend_ref[b]
  base = sp * split_len
  # GMEM operands are flat [B·K·NS·groups, 64, 64] (or [B·K·groups, ..]):
  # a TMA view takes at most 5 strided dims, tiling included.
  program = (b * kv_heads + k) * splits + sp
  for src, dst in zip(q_refs, q_smem):
    n = dst.shape[0]
    for g in range(n):
      plgpu.copy_gmem_to_smem(src.at[(b * kv_heads + k) * n + g], dst.at[g],
                              barrier)
      plgpu.barrier_wait(barrier)

  shape = (ROWS, ROWS)
  row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_L.WGMMA)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_L.WGMMA)
  limit = qend - 1 + row // groups                    # causal limit per row

  def body(idx, *tile_and_carry):
    (i,) = idx
    *tile, carry = tile_and_carry
    kc, kn = tile[:nk], tile[nk:2 * nk]
    vc, vn = tile[2 * nk:2 * nk + nv], tile[2 * nk + nv:]
    accs, m_i, l_i = carry
    for ref, spec, smem in zip(kc, key_specs, k_smem):
      _dequantize_into(ref, spec, smem, mode)
    plgpu.commit_smem()
    s = None
    for spec, qs, ks, norm_ref in zip(key_specs, q_smem, k_smem, kn):
      def qk(acc_ref, qs=qs, ks=ks, n=_groups(spec)):
        for j in range(n):
          plgpu.wgmma(acc_ref, qs.at[j], ks.at[j].transpose((1, 0)))
        return acc_ref[...]
      part = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
      norm = plgpu.load(norm_ref, layout=_L.WGMMA.reduce(0),
                        optimized=False)
      part = part * jax.lax.broadcast_in_dim(norm, shape, [1])
      s = part if s is None else s + part
    pos = base + i * ROWS + col
    s = jnp.where((pos < qlen) & (pos <= limit), s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_i - m_safe)
    p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, shape, [0]))
    l_new = l_i * alpha + jnp.sum(p, axis=1)
    # P (times the value norms, per part) goes through SMEM: wgmma reads
    # its A operand there, which interpret mode also supports.
    for ps, norm_ref in zip(p_smem, vn):
      norm = plgpu.load(norm_ref, layout=_L.WGMMA.reduce(0),
                        optimized=False)
      ps[0] = (p * jax.lax.broadcast_in_dim(norm, shape, [1])).astype(
          jnp.float16)
    for ref, spec, smem in zip(vc, value_specs, v_smem):
      _dequantize_into(ref, spec, smem, mode)
    plgpu.commit_smem()
    new_accs = []
    for part_accs, vs, ps in zip(accs, v_smem, p_smem):
      outs = []
      for j, acc in enumerate(part_accs):
        def mma(acc_ref, ps=ps, vj=vs.at[j]):
          plgpu.wgmma(acc_ref, ps.at[0], vj)
          return acc_ref[...]
        update = pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))
        outs.append(acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
                    + update)
      new_accs.append(tuple(outs))
    return tuple(new_accs), m_new, l_new

  def zeros(shape, layout):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)

  accs = tuple(tuple(zeros((ROWS, GROUP), _L.WGMMA)
                     for _ in range(_groups(s))) for s in value_specs)
  m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                         _L.WGMMA.reduce(1))
  l0 = zeros((ROWS,), _L.WGMMA.reduce(1))
  n_tiles = split_len // ROWS
  tile0 = base // ROWS

  def code_spec(p):
    return plgpu.BlockSpec((ROWS, p), lambda i: (tile0 + i, 0))

  norm_spec = plgpu.BlockSpec((ROWS,), lambda i: (tile0 + i,))
  in_specs = ([code_spec(r.shape[-1]) for r in kc_refs]
              + [norm_spec] * nk
              + [code_spec(r.shape[-1]) for r in vc_refs]
              + [norm_spec] * nv)
  pipeline = plgpu.emit_pipeline(body, grid=(n_tiles,), in_specs=in_specs,
                                 max_concurrent_steps=2,
                                 init_carry=(accs, m0, l0))
  accs, m_i, l_i = pipeline(*[r.at[b, k] for r in kc_refs + kn_refs
                              + vc_refs + vn_refs])
  for part_accs, smem in zip(accs, o_smem):
    for g, acc in enumerate(part_accs):
      smem[g] = acc
  ml_smem[0] = m_i
  ml_smem[1] = l_i
  plgpu.commit_smem()
  for smem, out in zip(o_smem, o_refs):
    n = smem.shape[0]
    for g in range(n):
      plgpu.copy_smem_to_gmem(smem.at[g], out.at[program * n + g])
  plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[program])
  plgpu.wait_smem_to_gmem(0)


def _query_groups(q: jax.Array) -> jax.Array:
  """f32[B, K, M, Dp] -> f16[B·K·Dp/64, 64, 64], rows past M zero."""
  b, kv, m, d = q.shape
  q = jnp.pad(q, ((0, 0), (0, 0), (0, ROWS - m), (0, 0)))
  q = q.reshape(b, kv, ROWS, d // GROUP, GROUP)
  q = jnp.moveaxis(q, 3, 2).reshape(b * kv * (d // GROUP), ROWS, GROUP)
  return q.astype(jnp.float16)


def fused_attention(inp: parts.KernelInputs, *, splits: int = 8,
                    lookup_mode: str = "poly", interpret=None):
  """Runs the kernel: (acc per value part [B,K,NS,M,Dp], m, l [B,K,NS,M])."""
  _check(inp, splits)
  specs, queries, codes, norms = _kernel_specs(inp)
  b, kv, m, _ = inp.q[0].shape
  cap = inp.value_codes[0].shape[2]
  split_len = cap // splits

  programs = b * kv * splits
  out_type = [jax.ShapeDtypeStruct((programs * _groups(s), ROWS, GROUP),
                                   jnp.float32) for s in inp.value_specs]
  out_type.append(jax.ShapeDtypeStruct((programs, 2, ROWS), jnp.float32))
  scratch = [_group_smem(_groups(s)) for s in specs]              # queries
  scratch += [_group_smem(_groups(s)) for s in specs]             # keys
  scratch += [_group_smem(_groups(s)) for s in inp.value_specs]   # values
  scratch += [_group_smem(1) for _ in inp.value_specs]            # P
  scratch += [plgpu.SMEM((_groups(s), ROWS, GROUP), jnp.float32)
              for s in inp.value_specs]                           # outputs
  scratch += [plgpu.SMEM((2, ROWS), jnp.float32), plgpu.Barrier()]
  kernel = plgpu.kernel(
      functools.partial(_kernel, key_specs=tuple(specs),
                        value_specs=inp.value_specs, groups=inp.groups,
                        split_len=split_len, kv_heads=kv, splits=splits,
                        mode=lookup_mode),
      out_type=out_type, scratch_types=scratch, grid=(b, kv, splits),
      grid_names=("b", "k", "s"), interpret=interpret)
  outs = kernel(inp.qlen, inp.qpos_end,
                *[_query_groups(q) for q in queries],
                *codes, *norms, *inp.value_codes, *inp.value_norms)
  nv = len(inp.value_specs)
  accs = []
  for o in outs[:nv]:                          # [B·K·NS·Dp/64, 64, 64]
    o = o.reshape(programs, -1, ROWS, GROUP)
    o = jnp.moveaxis(o, 1, 2)[:, :m]           # [B·K·NS, M, Dp/64, 64]
    accs.append(o.reshape(b, kv, splits, m, -1))
  ml = outs[nv][..., :m].reshape(b, kv, splits, 2, m)
  return accs, ml[:, :, :, 0], ml[:, :, :, 1]


@jax.jit(static_argnames=("scale", "splits", "lookup_mode", "interpret"))
def _attention(q, cache, lengths, scale, splits, lookup_mode, interpret):
  inp = parts.prepare(q, cache, lengths, scale)
  acc, m, l = fused_attention(inp, splits=splits, lookup_mode=lookup_mode,
                              interpret=interpret)
  return parts.finish(acc, m, l, q, cache, lengths, scale)


def default_splits(cache, target_programs: int = 264) -> int:
  """Sequence splits so that B·K·NS programs fill the GPU (2 per SM)."""
  programs = cache.batch * cache.kv_heads
  splits = 1
  while (programs * splits < target_programs
         and cache.capacity % (ROWS * splits * 2) == 0):
    splits *= 2
  return splits


def attention(q: jax.Array, cache, lengths: jax.Array, *,
              scale: float | None = None, splits: int | None = None,
              lookup_mode: str = "poly",
              interpret: bool | None = None) -> jax.Array:
  """q [B, T, H, D] over a TurboQuantCache -> f32[B, T, H, D].

  splits: sequence splits per (sequence, KV head); default picks enough
  programs to fill the GPU. lookup_mode: "poly" (odd polynomial through
  the codebook) or "select" (a chain of 2^b - 1 selects). interpret=None
  uses Mosaic GPU interpret mode when the backend is not a GPU.
  """
  reason = parts.supported(cache)
  if reason:
    raise NotImplementedError(reason)
  if lookup_mode not in ("poly", "select"):
    raise ValueError(f"{lookup_mode=!r}: expected 'poly' or 'select'")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  if interpret is False:
    interpret = None
  if splits is None:
    splits = default_splits(cache)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _attention(q, cache, lengths, scale, splits, lookup_mode, interpret)

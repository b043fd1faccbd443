"""impl="pallas_gpu": fused attention over packed TurboQuant codes, Mosaic GPU.

Version 1 (correct first, not yet fast): grid (B, K, NS) over sequences, KV
heads and sequence splits; one warpgroup per program. A pipeline streams
tiles of 64 tokens of packed key/value codes and norms from HBM into SMEM
(TMA); each tile is unpacked in registers (shift + mask per contiguous
coordinate chunk), mapped to centroids by a select chain, and scored against
the pre-rotated queries on the CUDA cores. Each of the 64 rows of a tile is
its own online-softmax stream (tokens r, r+64, r+128, ... of the split), so
no cross-row reduction is needed inside the loop; the per-row states
(m, l, acc) are merged afterwards by XLA with the same log-sum-exp combine
as the sequence splits. All T·G queries of a GQA group are handled by the
same program, sharing each loaded tile. Values accumulate in the rotated
domain; XLA rotates back once per output (parts.finish).

Limits (NotImplementedError -> impl=None falls back to "xla"): the packed
row of every part must be a multiple of 16 bytes (a TMA row), the capacity a
multiple of 64 · NS, and no prod keys yet.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from turboquant_jax.kernels.decode_attention import parts

ROWS = 64      # tokens per tile = rows of the WGMMA register layout
STAT = 128     # width of the stored (m, l) rows (splat stores need 128)


def _check(inp: parts.KernelInputs, splits: int) -> None:
  cap = inp.value_codes[0].shape[2]
  if cap % (ROWS * splits):
    raise NotImplementedError(f"capacity {cap} must be a multiple of "
                              f"{ROWS} * {splits=}")
  for spec, codes in zip(inp.key_specs + inp.value_specs,
                         inp.key_codes + inp.value_codes):
    if spec.prod:
      raise NotImplementedError("pallas_gpu: prod keys not supported yet")
    if codes.shape[-1] % 16:
      raise NotImplementedError(
          f"pallas_gpu: packed row of {codes.shape[-1]} bytes (dim "
          f"{spec.dim}, {spec.bits} bits) is not a multiple of 16")


def _unpack_lookup(words, spec):
  """u8[64, P] tile -> list of f32[64, Dc] centroid chunks."""
  return [parts.lookup(c, spec.centroids)
          for c in parts.unpack_chunks(words, spec.bits, spec.dim)]


_ROW = plgpu.Layout.WGMMA.reduce(1)     # a [64] vector: one value per row
_COL = plgpu.Layout.WGMMA.reduce(0)     # a [Dc] vector: one per column


def _load(ref, layout):
  return plgpu.load(ref, layout=layout, optimized=False)


def _kernel(qlen_ref, qend_ref, *refs, key_specs, value_specs, groups,
            split_len, m_queries):
  nk, nv = len(key_specs), len(value_specs)
  q_refs = refs[:nk]                                  # [B, K, M, Dp]
  kc_refs = refs[nk:2 * nk]                           # [B, K, S, P]
  kn_refs = refs[2 * nk:3 * nk]                       # [B, K, S]
  vc_refs = refs[3 * nk:3 * nk + nv]
  vn_refs = refs[3 * nk + nv:3 * nk + 2 * nv]
  rest = refs[3 * nk + 2 * nv:]
  acc_out, ml_out = rest[:nv], rest[nv]               # [B,K,NS,M,Dp], [..,2,64]
  scratch = rest[nv + 1:]
  q_smem = scratch[:nk]                               # [M, Dp] f32
  acc_smem = scratch[nk:nk + nv]                      # [M, Dp] f32
  ml_smem, barrier = scratch[nk + nv], scratch[nk + nv + 1]

  b = jax.lax.axis_index("b")
  k = jax.lax.axis_index("k")
  sp = jax.lax.axis_index("s")
  qlen = qlen_ref[b]
  qend = qend_ref[b]
  base = sp * split_len
  for src, dst in zip(q_refs, q_smem):
    plgpu.copy_gmem_to_smem(src.at[b, k], dst, barrier)
    plgpu.barrier_wait(barrier)
  row = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0, layout=_ROW)

  def body(idx, *tile_refs_and_carry):
    (i,) = idx
    *tile, carry = tile_refs_and_carry
    kc, kn = tile[:nk], tile[nk:2 * nk]
    vc, vn = tile[2 * nk:2 * nk + nv], tile[2 * nk + nv:]
    pos = base + i * ROWS + row
    valid = pos < qlen
    k_chunks = [_unpack_lookup(_load(r, plgpu.Layout.WGMMA)
                               .astype(jnp.int32), s)
                for r, s in zip(kc, key_specs)]
    k_norms = [_load(r, _ROW) for r in kn]
    v_chunks = [_unpack_lookup(_load(r, plgpu.Layout.WGMMA)
                               .astype(jnp.int32), s)
                for r, s in zip(vc, value_specs)]
    v_norms = [jnp.where(valid, _load(r, _ROW), 0.0) for r in vn]
    new_carry = []
    for mq in range(m_queries):
      m_i, l_i, accs = carry[mq]
      s = None
      for chunks, spec, qs, kn in zip(k_chunks, key_specs, q_smem, k_norms):
        dc = spec.dim // len(chunks)
        part = None
        for j, deq in enumerate(chunks):
          qv = _load(qs.at[mq, pl.ds(j * dc, dc)], _COL)
          d = jnp.sum(deq * jax.lax.broadcast_in_dim(qv, deq.shape, [1]),
                      axis=1)
          part = d if part is None else part + d
        s = part * kn if s is None else s + part * kn
      ok = valid & (pos <= qend - 1 + mq // groups)
      s = jnp.where(ok, s, -jnp.inf)
      m_new = jnp.maximum(m_i, jnp.max(s))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m_i - m_safe)
      p = jnp.exp(s - m_safe)
      l_new = l_i * alpha + jnp.sum(p)
      new_accs = []
      for acc_chunks, chunks, vnorm in zip(accs, v_chunks, v_norms):
        pw = p * vnorm
        new_accs.append(tuple(
            a * alpha + jnp.sum(
                deq * jax.lax.broadcast_in_dim(pw, deq.shape, [0]), axis=0)
            for a, deq in zip(acc_chunks, chunks)))
      new_carry.append((m_new, l_new, tuple(new_accs)))
    return tuple(new_carry)

  def init():
    accs = tuple(
        tuple(plgpu.layout_cast(
            jnp.zeros((s.dim // parts.chunk_count(s.bits),), jnp.float32),
            _COL) for _ in range(parts.chunk_count(s.bits)))
        for s in value_specs)
    return tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), accs)
                 for _ in range(m_queries))

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
                                 init_carry=init())
  final = pipeline(*[r.at[b, k] for r in kc_refs + kn_refs + vc_refs
                     + vn_refs])
  for mq in range(m_queries):
    m_i, l_i, accs = final[mq]
    ml_smem[mq, 0] = jnp.broadcast_to(m_i, (STAT,))
    ml_smem[mq, 1] = jnp.broadcast_to(l_i, (STAT,))
    for a_smem, acc_chunks in zip(acc_smem, accs):
      dc = a_smem.shape[-1] // len(acc_chunks)
      for j, a in enumerate(acc_chunks):
        a_smem[mq, pl.ds(j * dc, dc)] = a
  plgpu.commit_smem()
  for a_smem, out in zip(acc_smem, acc_out):
    plgpu.copy_smem_to_gmem(a_smem, out.at[b, k, sp])
  plgpu.copy_smem_to_gmem(ml_smem, ml_out.at[b, k, sp])
  plgpu.wait_smem_to_gmem(0)


def fused_attention(inp: parts.KernelInputs, *, splits: int = 8,
                    interpret=None):
  """Runs the kernel: (acc per value part [B,K,NS,M,Dp], m, l [B,K,NS,M])."""
  _check(inp, splits)
  b, kv, m, _ = inp.q[0].shape
  cap = inp.value_codes[0].shape[2]
  split_len = cap // splits
  out_type = [jax.ShapeDtypeStruct((b, kv, splits, m, s.dim), jnp.float32)
              for s in inp.value_specs]
  out_type.append(jax.ShapeDtypeStruct((b, kv, splits, m, 2, STAT),
                                       jnp.float32))
  scratch = [plgpu.SMEM((m, s.dim), jnp.float32) for s in inp.key_specs]
  scratch += [plgpu.SMEM((m, s.dim), jnp.float32) for s in inp.value_specs]
  scratch += [plgpu.SMEM((m, 2, STAT), jnp.float32), plgpu.Barrier()]
  kernel = plgpu.kernel(
      functools.partial(_kernel, key_specs=inp.key_specs,
                        value_specs=inp.value_specs, groups=inp.groups,
                        split_len=split_len, m_queries=m),
      out_type=out_type, scratch_types=scratch, grid=(b, kv, splits),
      grid_names=("b", "k", "s"), interpret=interpret)
  outs = kernel(inp.qlen, inp.qpos_end, *inp.q, *inp.key_codes,
                *inp.key_norms, *inp.value_codes, *inp.value_norms)
  nv = len(inp.value_specs)
  ml = outs[nv]
  return list(outs[:nv]), ml[..., 0, 0], ml[..., 1, 0]


@jax.jit(static_argnames=("scale", "splits", "interpret"))
def _attention(q, cache, lengths, scale, splits, interpret):
  inp = parts.prepare(q, cache, lengths, scale)
  acc, m, l = fused_attention(inp, splits=splits, interpret=interpret)
  return parts.finish(acc, m, l, q, cache, lengths, scale)


def attention(q: jax.Array, cache, lengths: jax.Array, *,
              scale: float | None = None, splits: int | None = None,
              interpret: bool | None = None) -> jax.Array:
  """q [B, T, H, D] over a TurboQuantCache -> f32[B, T, H, D].

  splits: sequence splits per (sequence, KV head); default picks enough
  programs to fill the GPU. interpret=None uses Mosaic GPU interpret mode
  when the backend is not a GPU.
  """
  reason = parts.supported(cache)
  if reason:
    raise NotImplementedError(reason)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  if interpret is False:
    interpret = None
  if splits is None:
    programs = cache.batch * cache.kv_heads
    splits = 1
    while (programs * splits < 264 and cache.capacity % (ROWS * splits * 2)
           == 0):
      splits *= 2
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _attention(q, cache, lengths, scale, splits, interpret)

"""impl="pallas_tpu": fused decode/chunk attention over packed TurboQuant codes.

Grid (B, K, S/blk): one program per (sequence, KV head) walks the cache in
blocks of `block` tokens with an online softmax in VMEM. Per block it reads
the packed key/value codes and norms (never a dequantized tensor from HBM),
unpacks each contiguous coordinate chunk with a shift and a mask, maps codes
to centroids with a chain of selects (no gathers on the TPU), and feeds the
MXU: scores = q_rot · c[idx]ᵀ · norm, acc += (p · norm) · c[idx]. All T·G
queries of a GQA group share each loaded block. Blocks past a sequence's
length are skipped and their DMA is elided by clamping the block index.
Tested in TPU interpret mode on the CPU (pltpu.InterpretParams).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from turboquant_jax.kernels.decode_attention import parts

_DOT_T = (((1,), (1,)), ((), ()))      # contract the last axes: a @ bᵀ


def _scores(q, words, norms, spec):
  """q f32[M, Dp] · centroids(words)ᵀ · norms -> f32[M, blk]."""
  chunks = parts.unpack_chunks(words, spec.bits, spec.dim)
  dc = spec.dim // len(chunks)
  s = None
  for j, code in enumerate(chunks):
    deq = parts.lookup(code, spec.centroids)                  # [blk, dc]
    part = jax.lax.dot_general(q[:, j * dc:(j + 1) * dc], deq, _DOT_T,
                               preferred_element_type=jnp.float32)
    s = part if s is None else s + part
  return s * norms


def _qjl_scores(sq, sign_words, coef, dim):
  """The QJL residual term: (S q) · signsᵀ · coef -> f32[M, blk]."""
  chunks = parts.unpack_chunks(sign_words, 1, dim)
  dc = dim // len(chunks)
  s = None
  for j, code in enumerate(chunks):
    sign = code.astype(jnp.float32) * 2.0 - 1.0
    part = jax.lax.dot_general(sq[:, j * dc:(j + 1) * dc], sign, _DOT_T,
                               preferred_element_type=jnp.float32)
    s = part if s is None else s + part
  return s * coef


def _kernel(qlen_ref, qend_ref, *refs, key_specs, value_specs, block, groups,
            num_blocks):
  it = iter(refs)
  keys = []
  for spec in key_specs:
    q = next(it)
    sq, signs, coef = (next(it), next(it), next(it)) if spec.prod else (
        None, None, None)
    codes = next(it) if spec.bits else None
    norms = next(it) if spec.bits else None
    keys.append((spec, q, sq, signs, coef, codes, norms))
  values = [(spec, next(it), next(it)) for spec in value_specs]
  acc_out = [next(it) for _ in value_specs]
  m_out, l_out = next(it), next(it)
  m_sc, l_sc = next(it), next(it)
  acc_sc = [next(it) for _ in value_specs]

  b, i = pl.program_id(0), pl.program_id(2)
  qlen = qlen_ref[b]

  @pl.when(i == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    for a in acc_sc:
      a[...] = jnp.zeros(a.shape, jnp.float32)

  @pl.when(i * block < qlen)
  def _block():
    s = None
    for spec, q, sq, signs, coef, codes, norms in keys:
      part = None
      if spec.bits:
        part = _scores(q[...], codes[...], norms[...], spec)
      if spec.prod:
        qjl = _qjl_scores(sq[...], signs[...], coef[...], spec.dim)
        part = qjl if part is None else part + qjl
      s = part if s is None else s + part
    m_rows = s.shape[0]
    pos = i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    qpos = qend_ref[b] - 1 + jax.lax.broadcasted_iota(
        jnp.int32, (m_rows, 1), 0) // groups
    in_range = pos < qlen                                     # [1, blk]
    s = jnp.where(in_range & (pos <= qpos), s, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m_prev - m_safe)                          # 0 if -inf
    p = jnp.exp(s - m_safe)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    for (spec, codes, norms), a in zip(values, acc_sc):
      # Out-of-range rows of a partial last block hold garbage: zero them.
      pv = p * jnp.where(in_range, norms[...], 0.0)           # [M, blk]
      chunks = parts.unpack_chunks(codes[...], spec.bits, spec.dim)
      dc = spec.dim // len(chunks)
      for j, code in enumerate(chunks):
        deq = parts.lookup(code, spec.centroids)              # [blk, dc]
        sl = pl.ds(j * dc, dc)
        a[:, sl] = alpha * a[:, sl] + jnp.dot(
            pv, deq, preferred_element_type=jnp.float32)

  @pl.when(i == num_blocks - 1)
  def _store():
    for a, out in zip(acc_sc, acc_out):
      out[...] = a[...]
    m_out[...] = m_sc[...]
    l_out[...] = l_sc[...]


def fused_attention(inp: parts.KernelInputs, *, block: int = 256,
                    interpret=False):
  """Runs the kernel: returns (acc per value part [B,K,1,M,Dp], m, l)."""
  b, kv, m, _ = inp.q[0].shape
  cap = inp.value_codes[0].shape[2]
  block = min(block, max(8, -(-cap // 8) * 8))
  num_blocks = -(-cap // block)

  def clamp(bi, i, qlen_ref):          # skip DMAs past the sequence's end
    last = jnp.maximum((qlen_ref[bi] + block - 1) // block - 1, 0)
    return jnp.minimum(i, last)

  def seq_map(bi, ki, i, qlen_ref, qend_ref):     # [B, K, S, P] blocks
    del qend_ref
    return bi, ki, clamp(bi, i, qlen_ref), 0

  def row_map(bi, ki, i, qlen_ref, qend_ref):     # [B, K, 1, S] blocks
    del qend_ref
    return bi, ki, 0, clamp(bi, i, qlen_ref)

  def head_map(bi, ki, i, *_):
    return bi, ki, 0, 0

  def row(x):                          # [B, K, S] -> [B, K, 1, S] for [1, blk]
    return x[:, :, None, :]

  args, in_specs = [], []
  for spec, q, sq, signs, coef, codes, norms in zip(
      inp.key_specs, inp.q, inp.sq, inp.key_signs, inp.key_coef,
      inp.key_codes, inp.key_norms):
    args.append(q)
    in_specs.append(pl.BlockSpec((None, None, m, spec.dim), head_map))
    if spec.prod:
      args += [sq, signs, row(coef)]
      in_specs += [pl.BlockSpec((None, None, m, spec.dim), head_map),
                   pl.BlockSpec((None, None, block, signs.shape[-1]),
                                seq_map),
                   pl.BlockSpec((None, None, 1, block), row_map)]
    if spec.bits:
      args += [codes, row(norms)]
      in_specs += [pl.BlockSpec((None, None, block, codes.shape[-1]),
                                seq_map),
                   pl.BlockSpec((None, None, 1, block), row_map)]
  for spec, codes, norms in zip(inp.value_specs, inp.value_codes,
                                inp.value_norms):
    args += [codes, row(norms)]
    in_specs += [pl.BlockSpec((None, None, block, codes.shape[-1]), seq_map),
                 pl.BlockSpec((None, None, 1, block), row_map)]

  out_shape = [jax.ShapeDtypeStruct((b, kv, m, s.dim), jnp.float32)
               for s in inp.value_specs]
  out_shape += [jax.ShapeDtypeStruct((b, kv, m, 1), jnp.float32)] * 2
  out_specs = [pl.BlockSpec((None, None, m, s.dim), head_map)
               for s in inp.value_specs]
  out_specs += [pl.BlockSpec((None, None, m, 1), head_map)] * 2
  scratch = [pltpu.VMEM((m, 1), jnp.float32)] * 2
  scratch += [pltpu.VMEM((m, s.dim), jnp.float32) for s in inp.value_specs]

  kernel = functools.partial(
      _kernel, key_specs=inp.key_specs, value_specs=inp.value_specs,
      block=block, groups=inp.groups, num_blocks=num_blocks)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, kv, num_blocks),
          in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(inp.qlen, inp.qpos_end, *args)
  acc = [a[:, :, None] for a in outs[:-2]]
  m_out, l_out = outs[-2][..., 0], outs[-1][..., 0]
  return acc, m_out[:, :, None], l_out[:, :, None]


@jax.jit(static_argnames=("scale", "block", "interpret"))
def _attention(q, cache, lengths, scale, block, interpret):
  inp = parts.prepare(q, cache, lengths, scale)
  acc, m, l = fused_attention(inp, block=block, interpret=interpret)
  return parts.finish(acc, m, l, q, cache, lengths, scale)


def attention(q: jax.Array, cache, lengths: jax.Array, *,
              scale: float | None = None, block: int = 256,
              interpret: bool | None = None) -> jax.Array:
  """q [B, T, H, D] over a TurboQuantCache -> f32[B, T, H, D].

  Raises NotImplementedError for caches the kernel cannot read (so that
  impl=None falls back to "xla"). interpret=None runs TPU interpret mode when
  the backend is not a TPU.
  """
  reason = parts.supported(cache)
  if reason:
    raise NotImplementedError(reason)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if interpret is True:
    interpret = pltpu.InterpretParams()
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _attention(q, cache, lengths, scale, block, interpret)

"""impl="xla": attention read straight from the codes, in the rotated domain.

For each KV head the queries are rotated once (⟨q, Πᵀ c⟩ = ⟨Π q, c⟩) and
scored against the centroid values times the stored norms (plus the QJL
term for prod keys); probabilities weight the value centroids in the value
rotation's domain and the result is rotated back once per output. No token
is ever mapped back to the original domain. Equal to the reference up to
float rounding. A FullCache is read in the wider of its dtype and the
query's (f32 accumulation); other cache kinds fall back to the reference.
"""

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache import full_cache
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels.decode_attention import reference
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant

_HI = jax.lax.Precision.HIGHEST


def _plain_scores(q: turboquant.Quantizer, qt, y: jax.Array) -> jax.Array:
  """y [B, M, D] (M = T·G queries) against qt [B, S] -> [B, M, S]."""
  y_rot = rotation.apply(q.rotation, y)
  s = jnp.zeros((*y.shape[:2], qt.shape[-1]), jnp.float32)
  if q.mse_bits:
    s = jnp.einsum("bmd,bsd->bms", y_rot,
                   turboquant.rotated_reconstruction(q, qt), precision=_HI)
  if q.method == turboquant.Method.PROD:
    sy = jnp.einsum("bmd,kd->bmk", y_rot, q.sketch, precision=_HI)
    signs = packing.unpack_signs(qt.signs, q.sketch_dim)
    coef = turboquant._qjl_coefficient(q, qt)                   # [B, S]
    s = s + coef[:, None, :] * jnp.einsum("bmk,bsk->bms", sy, signs,
                                          precision=_HI)
  return s


def _plain_values(q: turboquant.Quantizer, qt, p: jax.Array) -> jax.Array:
  """p [B, M, S] weights of qt [B, S] -> [B, M, D] (rotated back once)."""
  acc = jnp.einsum("bms,bsd->bmd", p, turboquant.rotated_reconstruction(
      q, qt), precision=_HI)
  return rotation.invert(q.rotation, acc)


def _head_scores(q, qt, y):
  if isinstance(q, split.SplitQuantizer):
    return (_plain_scores(q.outlier, qt.outlier,
                          jnp.take(y, q.outlier_channels, axis=-1))
            + _plain_scores(q.regular, qt.regular,
                            jnp.take(y, q.regular_channels, axis=-1)))
  return _plain_scores(q, qt, y)


def _head_values(q, qt, p, dim):
  if isinstance(q, split.SplitQuantizer):
    out = jnp.zeros((*p.shape[:2], dim), jnp.float32)
    out = out.at[..., q.outlier_channels].set(
        _plain_values(q.outlier, qt.outlier, p))
    return out.at[..., q.regular_channels].set(
        _plain_values(q.regular, qt.regular, p))
  return _plain_values(q, qt, p)


def _over_heads(fn, q, *args):
  """vmaps fn over the KV-head axis (axis 1 of data, 0 of a split q)."""
  q_axis = 0 if isinstance(q, split.SplitQuantizer) else None
  return jax.vmap(fn, in_axes=(q_axis,) + (1,) * len(args),
                  out_axes=1)(q, *args)


@jax.jit(static_argnames=("scale",))
def attention(q: jax.Array, cache, lengths: jax.Array,
              scale: float | None = None) -> jax.Array:
  """q [B, T, H, D] over a TurboQuantCache or FullCache -> f32[B, T, H, D]."""
  if isinstance(cache, full_cache.FullCache):
    return _dense_attention(q, cache, lengths, scale)
  if not isinstance(cache, turboquant_cache.TurboQuantCache):
    return reference.attention_reference(q, cache, lengths, scale=scale)
  b, t, h, d = q.shape
  kv, cap = cache.kv_heads, cache.capacity
  g = h // kv
  scale = d ** -0.5 if scale is None else scale
  # [B, K, T·G, D]: all queries of a GQA group share each head's codes.
  qh = jnp.moveaxis(q.astype(jnp.float32).reshape(b, t, kv, g, d), 1, 2)
  qh = qh.reshape(b, kv, t * g, d)
  keys, values = turboquant_cache.tensors(cache)     # norms decoded (8-bit)
  s = _over_heads(_head_scores, cache.key_quantizer, keys, qh)
  mask = reference.causal_mask(lengths, t, cap)                # [B, T, S]
  mask = jnp.repeat(mask, g, axis=1)[:, None]                  # [B,1,TG,S]
  exact = _exact_tokens(cache, lengths)
  if exact is not None:
    ek, ev, epos = exact                                       # E tokens
    in_exact = jnp.zeros((b, cap + 1), bool).at[
        jnp.arange(b)[:, None], jnp.where(epos >= 0, epos, cap)].set(True)
    in_exact = in_exact[:, :cap]                               # [B, S]
    se = jnp.einsum("bkmd,bked->bkme", qh, ek, precision=_HI)
    s_all = jnp.concatenate([s, se], axis=-1) * scale
    emask = (epos[:, None, None, :] >= 0) & (
        epos[:, None, None, :] <= _query_positions(lengths, t, g, cap)[
            :, None, :, None])
    qmask = mask & ~in_exact[:, None, None, :]
    p = reference.masked_softmax(s_all, jnp.concatenate([
        jnp.broadcast_to(qmask, s.shape), jnp.broadcast_to(emask, se.shape)],
                                                        axis=-1))
    p_q, p_e = p[..., :cap], p[..., cap:]
    out = _over_heads(lambda vq, vqt, pp: _head_values(vq, vqt, pp, d),
                      cache.value_quantizer, values, p_q)
    out = out + jnp.einsum("bkme,bked->bkmd", p_e, ev, precision=_HI)
  else:
    p = reference.masked_softmax(s * scale, mask)
    out = _over_heads(lambda vq, vqt, pp: _head_values(vq, vqt, pp, d),
                      cache.value_quantizer, values, p)
  out = out.reshape(b, kv, t, g, d)
  return jnp.moveaxis(out, 2, 1).reshape(b, t, h, d)


def _dense_attention(q, cache, lengths, scale):
  """Attention over a full-precision cache as a model runs it: in the
  wider of the query's and the cache's dtypes (bf16 for a bf16 model over a
  bf16 cache; f32 on a CPU), products accumulated in f32, probabilities in
  that dtype for the value product. A bf16 cache is read once as it is
  (the reference converts it all to f32 first, which at B=32 took 2.5x
  cuDNN's time per layer on the H200)."""
  b, t, h, d = q.shape
  kv = cache.kv_heads
  dt = jnp.promote_types(q.dtype, cache.keys.dtype)
  if jax.default_backend() == "cpu":   # XLA:CPU has no bf16 x bf16 -> f32 dot
    dt = jnp.promote_types(dt, jnp.float32)
  scale = d ** -0.5 if scale is None else scale
  # f32 stays f32 on a GPU too (its default f32 dot rounds to TF32).
  prec = _HI if dt == jnp.float32 else None
  qg = q.reshape(b, t, kv, h // kv, d).astype(dt)
  s = jnp.einsum("btkgd,bksd->bkgts", qg, cache.keys.astype(dt),
                 preferred_element_type=jnp.float32, precision=prec) * scale
  mask = reference.causal_mask(lengths, t, cache.capacity)[:, None, None]
  p = reference.masked_softmax(s, mask)
  out = jnp.einsum("bkgts,bksd->btkgd", p.astype(dt),
                   cache.values.astype(dt),
                   preferred_element_type=jnp.float32, precision=prec)
  return out.reshape(b, t, h, d)


def _exact_tokens(cache, lengths):
  """(keys f32[B, K, E, D], values, positions i32[B, E] (-1: empty)) of the
  full-precision tokens (window ring, then sink), or None without any. A
  position held by both is kept once, in the sink."""
  cap, w, n = cache.capacity, cache.config.window, cache.config.sink
  lengths = jnp.minimum(lengths, cap)
  ks, vs, ps = [], [], []
  if w:
    wpos = common.window_positions(lengths, w)                 # [B, W]
    ps.append(jnp.where(wpos >= n, wpos, -1))
    ks.append(cache.window_keys)
    vs.append(cache.window_values)
  if n:
    ps.append(common.sink_positions(lengths, n))               # [B, N]
    ks.append(cache.sink_keys)
    vs.append(cache.sink_values)
  if not ps:
    return None
  cat = lambda xs: jnp.concatenate([x.astype(jnp.float32) for x in xs], 2)
  return cat(ks), cat(vs), jnp.concatenate(ps, axis=1)


def _query_positions(lengths, t, g, cap):
  """i32[B, T·G]: each query's absolute position."""
  lengths = jnp.minimum(lengths, cap)
  qpos = lengths[:, None] - t + jnp.arange(t)[None, :]
  return jnp.repeat(qpos, g, axis=1)

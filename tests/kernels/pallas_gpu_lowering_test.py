"""The Mosaic GPU kernels lower for CUDA on the CPU.

jax lowers a jitted function for another platform without its device
(`lower(lowering_platforms=("cuda",))`); for a Mosaic GPU kernel that runs
Pallas' lowering and Mosaic GPU's layout inference, which is where device
runs failed before ("Failed to infer a possible set of layouts"). This
covers the paths interpret mode cannot (byte-permute lookup through inline
PTX, keys as a register wgmma operand) and every layout option. What only
the device checks: ptxas, and the numbers (experiments/probes).
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from turboquant_jax import cache as cache_lib
from turboquant_jax.kernels.decode_attention import pallas_gpu
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens

_SHAPES = [
    # (head dim, key bits, value bits, GQA group, query tokens, key method)
    (128, 4, 4, 4, 1, "mse"),
    (64, 3, 3, 8, 1, "mse"),          # 24-byte rows
    (256, 2, 2, 3, 1, "mse"),
    (128, 3.5, 2.5, 4, 1, "mse"),     # outlier split: 4+3 and 3+2 bit parts
    (128, 3, 4, 1, 2, "prod"),        # QJL sign parts
    (64, 4, 4, 8, 3, "mse"),          # 24 query columns -> N = 32
    (128, 4, 3, 4, 16, "mse"),        # 64 query columns
]
_OPTIONS = [
    dict(),
    dict(layout="queries"),
    dict(lookup_mode="prmt"),
    dict(key_registers=True),
    dict(lookup_mode="prmt", key_registers=True, tile_rows=128),
    dict(tile_rows=256, stages=3),
    dict(transpose_p=True, key_registers=True, lookup_mode="prmt"),
]


def _lower(dim, key_bits, value_bits, groups, tokens, method, **options):
  cfg = cache_lib.CacheConfig(key_bits=key_bits, value_bits=value_bits,
                              key_method=method)
  cache = cache_lib.init(cfg, 2, 2, 1024, dim)
  q = jnp.ones((2, tokens, 2 * groups, dim))
  fn = jax.jit(lambda q, c: pallas_gpu.attention(q, c, c.lengths,
                                                 interpret=False, **options))
  return fn.trace(q, cache).lower(lowering_platforms=("cuda",))


class LoweringTest(parameterized.TestCase):

  @parameterized.parameters(*[(s, o) for s in _SHAPES for o in _OPTIONS])
  def test_lowers_for_cuda(self, shape, options):
    if options.get("layout") == "queries" and shape[3] * shape[4] > 64:
      self.skipTest("more than 64 query rows")
    text = _lower(*shape, **options).as_text()
    self.assertIn("mosaic_gpu", text)

  def test_mismatched_wgmma_swizzles_fail_to_lower(self):
    # The check has teeth: V tiles with 128-byte rows against a 32-byte Pᵀ
    # (the first v4 layout, which failed on the H200) do not lower.
    group_smem = pallas_gpu._group_smem
    jax.clear_caches()
    try:
      pallas_gpu._group_smem = (
          lambda groups, swizzle=128, rows=64: group_smem(groups, 128, rows))
      with self.assertRaisesRegex(ValueError, "infer a possible set of"):
        _lower(128, 4, 4, 4, 1, "mse")
    finally:
      pallas_gpu._group_smem = group_smem
      jax.clear_caches()
    self.assertIs(pallas_gpu_tokens.base._group_smem, group_smem)


if __name__ == "__main__":
  absltest.main()

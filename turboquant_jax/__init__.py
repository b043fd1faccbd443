"""turboquant_jax: TurboQuant online vector quantization in JAX.

    import turboquant_jax as tq
    q = tq.make_quantizer(jax.random.key(0), dim=128, bits=4)
    qt = tq.quantize(q, x)            # x: [..., 128]
    x_hat = tq.dequantize(q, qt)
    scores = tq.inner_product(q, qt, queries)
"""

from turboquant_jax.quant.api import dequantize
from turboquant_jax.quant.api import inner_product
from turboquant_jax.quant.api import make_quantizer
from turboquant_jax.quant.api import quantize
from turboquant_jax.quant.codebook import boundaries
from turboquant_jax.quant.codebook import codebook
from turboquant_jax.quant.codebook import gaussian_codebook
from turboquant_jax.quant.codebook import gaussian_mse
from turboquant_jax.quant.codebook import mse as codebook_mse
from turboquant_jax.quant.codebook import published_codebook
from turboquant_jax.quant.packing import pack
from turboquant_jax.quant.packing import unpack
from turboquant_jax.quant.rotation import Rotation
from turboquant_jax.quant.rotation import make_rotation
from turboquant_jax.quant.split import SplitQuantizedTensor
from turboquant_jax.quant.split import SplitQuantizer
from turboquant_jax.quant.split import make_split_quantizer
from turboquant_jax.quant.split import select_outliers
from turboquant_jax.quant.split import with_outlier_channels
from turboquant_jax.quant.turboquant import Method
from turboquant_jax.quant.turboquant import QuantizedTensor
from turboquant_jax.quant.turboquant import Quantizer

__version__ = "0.1.0"

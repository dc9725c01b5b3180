"""The positional encoding generator: a residual depthwise convolution over a feature map."""

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import Positive, checked_arguments
from ._conv import DepthwiseConv2d


class PEG(eqx.Module):
    """`x + DepthwiseConv(x)`: position information generated from a token map.

    A `kernel_size x kernel_size` depthwise convolution with bias, stride 1 and padding
    `kernel_size // 2`, added back to its input ("Conditional Positional Encodings for
    Vision Transformers", arXiv:2102.10882). Used by Twins-SVT, ScalableViT and RegionViT.
    """

    proj: DepthwiseConv2d

    @checked_arguments
    def __init__(self, dim: Positive, kernel_size: Positive = 3, *, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: channels of the map.
        - `kernel_size`: the square kernel's size; odd sizes keep the map's size.
        - `key`: a `jax.random.key` for the initialisation.
        """
        self.proj = DepthwiseConv2d(dim, kernel_size, padding=kernel_size // 2, key=key)

    def __call__(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "channels height width"]:
        return x + self.proj(x)

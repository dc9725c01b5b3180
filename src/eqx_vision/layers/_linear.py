"""Token-wise linear maps and normalisation over the feature axis."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..precision import _bfloat16 as bfloat16
from ._checks import checked_arguments
from ._init import full, uniform


class Linear(eqx.Module):
    """An affine map over the last axis, applied to every leading position at once.

    Unlike `eqx.nn.Linear`, which maps one vector, this layer takes any number of leading
    axes (`(seq, dim)` tokens, `(windows, seq, dim)`, ...), so a sequence of tokens is one
    matrix multiply. The weight has shape `(out_features, in_features)`, as in
    `torch.nn.Linear`, and is initialised the same way: uniform in
    $\\pm 1/\\sqrt{\\text{in\\_features}}$.

    On a bfloat16 input the product accumulates in float32 and is rounded once, and so are
    the two products of its backward pass; the weight and bias gradients are accumulated
    in float32 (see the [mixed precision guide](../precision.md)).
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    keep_bits: bool | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `in_features`: size of the last axis of the input.
        - `out_features`: size of the last axis of the output.
        - `use_bias`: whether to add a learned bias.
        - `key`: a `jax.random.key` for the initialisation.

        `keep_bits`, an ordinary field, is `None` (no leaf: a layer on its own holds arrays
        only) until a [`Stack`][eqx_vision.layers.Stack] that runs this layer sets it: to
        `True` under its `"linear"` policy, when a bfloat16 output is kept for the
        backward pass as its 16-bit pattern (see [`remat`][eqx_vision.remat]).
        """
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                "a Linear layer needs positive sizes; got in_features="
                f"{in_features}, out_features={out_features} (check the dimensions given)."
            )
        wkey, bkey = jr.split(key)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = uniform(wkey, (out_features, in_features), -bound, bound)
        self.bias = uniform(bkey, (out_features,), -bound, bound) if use_bias else None
        self.keep_bits = None
        self.in_features = in_features
        self.out_features = out_features

    def __call__(
        self, x: Float[Array, "*batch in_features"]
    ) -> Float[Array, "*batch out_features"]:
        if x.dtype == jnp.bfloat16:
            return bfloat16.linear(x, self.weight, self.bias, keep_bits=bool(self.keep_bits))
        return dense(x, self.weight, self.bias)


def dense(
    x: Float[Array, "*batch in_features"],
    weight: Float[Array, "out_features in_features"],
    bias: Float[Array, " out_features"] | None = None,
) -> Float[Array, "*batch out_features"]:
    """`x @ weight.T + bias` in the dtype of `x` (the parameters are cast at use)."""
    if x.dtype == jnp.bfloat16:
        return bfloat16.linear(x, weight, bias, keep_bits=False)
    y = x @ weight.astype(x.dtype).T
    return y if bias is None else y + bias.astype(x.dtype)


def gelu(x: Float[Array, "*shape"], *, keep_bits: bool = False) -> Float[Array, "*shape"]:
    """The exact (erf) GELU, as `torch.nn.GELU()`; `jax.nn.gelu` defaults to the tanh form.
    Evaluated in float32 at least and rounded once (a bfloat16 erf rounds at every step).

    With `keep_bits`, as a [`Stack`][eqx_vision.layers.Stack] under its `"linear"` policy
    asks of a [`FeedForward`][eqx_vision.layers.FeedForward], a bfloat16 GELU rounds its
    slope too and keeps its value and slope for the backward pass as 16-bit patterns."""
    if x.dtype == jnp.bfloat16 and keep_bits:
        return _gelu_kept(x)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return _gelu(wide).astype(x.dtype)


def _gelu_and_slope(x: Array) -> tuple[Array, Array]:
    """`gelu(x)` and `gelu'(x) = Φ(x) + x φ(x)`, in float32 at least, from one `erf`."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    cdf = 0.5 * (1.0 + jax.lax.erf(wide * (1.0 / math.sqrt(2.0))))
    density = jnp.exp(-0.5 * wide * wide) * (1.0 / math.sqrt(2.0 * math.pi))
    return wide * cdf, cdf + wide * density


@jax.custom_jvp
def _gelu(x: Array) -> Array:
    return _gelu_and_slope(x)[0]


@_gelu.defjvp
def _gelu_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # The slope shares the value's `erf` (see docs/performance.md, "GELU's derivative
    # shares its erf").
    (x,), (tx,) = primals, tangents
    value, slope = _gelu_and_slope(x)
    return value, tx * slope


_gelu_kept = bfloat16.keeping_value_and_slope(_gelu_and_slope)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, with a learned scale and shift.

    `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, as
    `torch.nn.LayerNorm(dim)`. The statistics are computed in float32 whatever the input
    dtype. Applied to `(channels, height, width)` feature maps by `ChannelLayerNorm`.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    @checked_arguments
    def __init__(self, dim: int, *, eps: float = 1e-5):
        """**Arguments:**

        - `dim`: size of the normalised (last) axis.
        - `eps`: added to the variance.
        """
        if dim <= 0:
            raise ValueError(f"LayerNorm needs a positive dimension; got dim={dim}.")
        self.weight = full((dim,), 1.0)
        self.bias = full((dim,), 0.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        return layer_norm(x, self.weight, self.bias, self.eps, axis=-1)


def layer_norm(
    x: Float[Array, "..."],
    weight: Float[Array, " dim"],
    bias: Float[Array, " dim"],
    eps: float,
    axis: int,
) -> Float[Array, "..."]:
    """Normalise `x` over `axis` and apply a per-feature affine map along that axis."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    y = y * weight.reshape(shape) + bias.reshape(shape)
    return y.astype(dtype)

"""Token-wise linear maps and normalisation over the feature axis."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._init import full, uniform


class Linear(eqx.Module):
    """An affine map over the last axis, applied to every leading position at once.

    Unlike `eqx.nn.Linear`, which maps one vector, this layer takes any number of leading
    axes (`(seq, dim)` tokens, `(windows, seq, dim)`, ...), so a sequence of tokens is one
    matrix multiply. The weight has shape `(out_features, in_features)`, as in
    `torch.nn.Linear`, and is initialised the same way: uniform in
    $\\pm 1/\\sqrt{\\text{in\\_features}}$.
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `in_features`: size of the last axis of the input.
        - `out_features`: size of the last axis of the output.
        - `use_bias`: whether to add a learned bias.
        - `key`: a `jax.random.key` for the initialisation.
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
        self.in_features = in_features
        self.out_features = out_features

    def __call__(
        self, x: Float[Array, "*batch in_features"]
    ) -> Float[Array, "*batch out_features"]:
        y = dense(x, self.weight.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y


def dense(
    x: Float[Array, "*batch in_features"], weight: Float[Array, "out_features in_features"]
) -> Float[Array, "*batch out_features"]:
    """`x @ weight.T`. In bfloat16 the product accumulates in float32 and is rounded once:
    the form XLA's CPU backend runs on its bfloat16 matrix units, several times faster
    than a bfloat16-in, bfloat16-out product."""
    if x.dtype == jnp.bfloat16:
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x, weight, dims, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    return x @ weight.T


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, with a learned scale and shift.

    `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, as
    `torch.nn.LayerNorm(dim)`. The statistics are computed in float32 whatever the input
    dtype. Applied to `(channels, height, width)` feature maps by `ChannelLayerNorm`.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

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


def gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The exact (erf) GELU, as `torch.nn.GELU()`; `jax.nn.gelu` defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)

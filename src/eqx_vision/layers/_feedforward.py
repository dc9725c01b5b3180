"""The position-wise feed-forward block."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import checked_arguments
from ._linear import LayerNorm, Linear, gelu
from ._random import split_key


class FeedForward(eqx.Module):
    """`[LayerNorm] → Linear → activation → Dropout → Linear → Dropout`, token by token.

    The transformer MLP of ViT and its relatives; the activation defaults to the exact
    (erf) GELU of the reference.
    """

    norm: LayerNorm | None
    fc1: Linear
    fc2: Linear
    hidden_dropout: eqx.nn.Dropout
    out_dropout: eqx.nn.Dropout
    keep_bits: bool | None
    activation: Callable[[Array], Array] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dropout: float = 0.0,
        norm: bool = True,
        norm_eps: float = 1e-5,
        out_dropout: bool = True,
        activation: Callable[[Array], Array] = gelu,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension, in and out.
        - `hidden_dim`: width of the hidden layer.
        - `dropout`: dropout rate after the activation and after the output layer.
        - `norm`: whether to layer-normalise the input first (pre-norm).
        - `norm_eps`: the epsilon of that LayerNorm.
        - `out_dropout`: whether to apply dropout after the output layer too.
        - `activation`: the hidden activation, exact GELU by default.
        - `key`: a `jax.random.key` for the initialisation.

        `keep_bits`, an ordinary field, is `None` until a
        [`Stack`][eqx_vision.layers.Stack] that runs this block sets it, as it does
        [`Linear`][eqx_vision.layers.Linear]'s: with `True` a bfloat16
        [`gelu`][eqx_vision.layers.gelu] (the default activation) keeps its value and
        slope for the backward pass as 16-bit patterns.
        """
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(
                f"FeedForward needs positive dim and hidden_dim; got dim={dim}, "
                f"hidden_dim={hidden_dim}."
            )
        key1, key2 = split_key(key, 2)
        assert key1 is not None and key2 is not None
        self.norm = LayerNorm(dim, eps=norm_eps) if norm else None
        self.fc1 = Linear(dim, hidden_dim, key=key1)
        self.fc2 = Linear(hidden_dim, dim, key=key2)
        self.hidden_dropout = eqx.nn.Dropout(dropout)
        self.out_dropout = eqx.nn.Dropout(dropout if out_dropout else 0.0)
        self.keep_bits = None
        self.activation = activation

    def __call__(
        self, x: Float[Array, "*batch dim"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch dim"]:
        """**Arguments:**

        - `x`: tokens with any leading axes, `(..., dim)`.
        - `key`: needed only for dropout in training mode.

        **Returns:** the same shape as `x`.
        """
        key1, key2 = split_key(key, 2)
        if self.norm is not None:
            x = self.norm(x)
        hidden = self.fc1(x)
        if self.activation is gelu:
            hidden = gelu(hidden, keep_bits=bool(self.keep_bits))
        else:
            hidden = self.activation(hidden)
        x = self.hidden_dropout(hidden, key=key1)
        return self.out_dropout(self.fc2(x), key=key2)

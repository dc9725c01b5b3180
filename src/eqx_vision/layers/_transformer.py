"""The pre-norm transformer block and the scanned transformer encoder built from it."""

import functools
import operator
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._attention import Attention
from ._checks import Positive, Rate, checked_arguments
from ._feedforward import FeedForward
from ._init import full, keys
from ._linear import LayerNorm, gelu
from ._random import split_key
from ._stack import Stack, stack_modules


Branch = TypeVar("Branch", bound=eqx.Module)


class Parallel(eqx.Module, Generic[Branch]):
    """The sum of `num_branches` modules of one structure applied to the same input.

    The branches are stored stacked and evaluated one after the other (Parallel ViT: "Three
    things everyone should know about Vision Transformers", arXiv:2203.09795): a `vmap`
    over the branches would turn each linear layer into a batched matrix product, which
    XLA runs more slowly on CPU.
    """

    branches: Branch
    num_branches: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self, make_branch: Callable[..., Branch], num_branches: Positive, *, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `make_branch`: called as `make_branch(key=key)` once per branch.
        - `num_branches`: number of branches, at least 1.
        - `key`: a `jax.random.key`, split into one key per branch.
        """
        self.branches = stack_modules([make_branch(key=k) for k in keys(key, num_branches)])
        self.num_branches = num_branches

    def __getitem__(self, index: int) -> Branch:
        dynamic, static = eqx.partition(self.branches, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[index], dynamic), static)

    def __call__(self, x: Any, *args: Any, key: PRNGKeyArray | None = None) -> Any:
        keys = None if key is None else jr.split(key, self.num_branches)
        branches: list[Any] = [self[i] for i in range(self.num_branches)]
        outs = [
            branch(x, *args, key=None if keys is None else keys[i])
            for i, branch in enumerate(branches)
        ]
        return jax.tree.map(lambda *o: functools.reduce(operator.add, o), *outs)


def layer_scale_init(index: int) -> float:
    """CaiT's LayerScale initial value for the layer at 0-based `index`.

    0.1 up to depth 18, 1e-5 up to 24, 1e-6 beyond, where the reference takes "depth" to be
    the layer's own 1-based position, not the depth of the network.
    """
    position = index + 1
    return 0.1 if position <= 18 else 1e-5 if position <= 24 else 1e-6


class DropPath(eqx.Module):
    """Stochastic depth (Huang et al., 2016, arXiv:1603.09382) over a stack of residual
    blocks: in training, each residual branch of block `i` is dropped for the example with
    probability `rates(depth)[i]` and otherwise scaled by `1 / (1 - rate)`; the rates rise
    linearly from 0 for the first block to `p` for the last (timm's `drop_path_rate`).
    Switched off by `eqx.nn.inference_mode`.
    """

    p: float
    inference: bool

    @checked_arguments
    def __init__(self, p: Rate = 0.0, *, inference: bool = False):
        self.p = p
        self.inference = inference

    def active(self) -> bool:
        return not self.inference and self.p > 0

    def rates(self, depth: int) -> Float[Array, " depth"]:
        return jnp.linspace(0.0, self.p, depth, dtype=jnp.float32)


def _drop_branch(y: Array, rate: Array, key: PRNGKeyArray) -> Array:
    """`y / (1 - rate)`, or zeros with probability `rate`."""
    keep = jr.bernoulli(key, 1.0 - rate)
    return jnp.where(keep, y / (1.0 - rate).astype(y.dtype), jnp.zeros_like(y))


class TransformerBlock(eqx.Module):
    """`x + attn(x)` then `x + ff(x)`, each branch optionally scaled (LayerScale).

    Both sub-blocks normalise their own input (pre-norm). `attn` and `ff` may be `Parallel`
    sums of several branches.
    """

    attn: Attention | Parallel[Attention]
    ff: FeedForward | Parallel[FeedForward]
    attn_scale: Float[Array, " dim"] | None
    ff_scale: Float[Array, " dim"] | None

    @checked_arguments
    def __init__(
        self,
        attn: Attention | Parallel[Attention],
        ff: FeedForward | Parallel[FeedForward],
        *,
        layer_scale: float | None = None,
        dim: Positive | None = None,
    ):
        """**Arguments:**

        - `attn`: the attention sub-block.
        - `ff`: the feed-forward sub-block.
        - `layer_scale`: if given, both residual branches are multiplied by a learned
          per-channel vector initialised to this value (CaiT); `dim` is then required.
        """
        self.attn = attn
        self.ff = ff
        if layer_scale is None:
            self.attn_scale = self.ff_scale = None
        else:
            if dim is None:
                raise ValueError("layer_scale needs dim.")
            self.attn_scale = full((dim,), layer_scale)
            self.ff_scale = full((dim,), layer_scale)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx_seq dim"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        drop_path: Float[Array, ""] | None = None,
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: the tokens.
        - `context`: extra keys/values for the attention (class or cross attention).
        - `key`: needed only for dropout in training mode.
        - `drop_path`: with `key`, the probability of dropping each residual branch
          (stochastic depth; see [`DropPath`][eqx_vision.layers.DropPath]).
        """
        path_keys = None
        if drop_path is not None and key is not None:
            key, path_key = jr.split(key)
            path_keys = jr.split(path_key)
        attn_key, ff_key = split_key(key, 2)
        y = self.attn(x, context, key=attn_key)
        if self.attn_scale is not None:
            y = _scale_channels(y, self.attn_scale)
        if path_keys is not None:
            assert drop_path is not None
            y = _drop_branch(y, drop_path, path_keys[0])
        x = x + y
        y = self.ff(x, key=ff_key)
        if self.ff_scale is not None:
            y = _scale_channels(y, self.ff_scale)
        if path_keys is not None:
            assert drop_path is not None
            y = _drop_branch(y, drop_path, path_keys[1])
        return x + y


def _scale_channels(y: Float[Array, "seq dim"], scale: Float[Array, " dim"]) -> Array:
    """`y * scale` (LayerScale), evaluated in float32 at least and rounded once: the
    scale's gradient is then a float32 sum (XLA's CPU backend sums bfloat16 in a slow
    tree of partial sums)."""
    wide = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(wide) * scale.astype(wide)).astype(y.dtype)


class Transformer(eqx.Module):
    """A scanned stack of `TransformerBlock`s with an optional final LayerNorm.

    The encoder of ViT: `depth` pre-norm blocks of multi-head attention (`heads` ×
    `dim_head`) and a GELU MLP of width `mlp_dim`. The attention variants and LayerScale
    are passed through to every block.
    """

    layers: Stack[TransformerBlock]
    norm: LayerNorm | None
    drop_path: DropPath

    @checked_arguments
    def __init__(
        self,
        dim: Positive,
        depth: Positive,
        heads: Positive,
        dim_head: Positive,
        mlp_dim: Positive,
        *,
        dropout: Rate = 0.0,
        final_norm: bool = True,
        layer_dropout: Rate = 0.0,
        layer_scale: bool | float = False,
        num_branches: Positive = 1,
        norm_eps: float = 1e-5,
        activation: Callable[[Array], Array] = gelu,
        drop_path: Rate = 0.0,
        attention: Callable[..., Attention] = Attention,
        key: PRNGKeyArray,
        **attention_options: Any,
    ):
        """**Arguments:**

        - `dim`, `depth`, `heads`, `dim_head`, `mlp_dim`: the encoder's shape.
        - `dropout`: dropout rate in attention and feed-forward blocks.
        - `final_norm`: whether the encoder ends with a LayerNorm.
        - `layer_dropout`: probability of skipping each block in training (CaiT).
        - `layer_scale`: `True` for CaiT's LayerScale, initialised by layer index; a number
          for a LayerScale initialised to that constant in every block; `False` for none.
        - `num_branches`: number of parallel attention and feed-forward branches per block.
        - `norm_eps`: the epsilon of every LayerNorm (1e-5 as `torch.nn.LayerNorm`; timm's
          ViTs use 1e-6).
        - `activation`: the feed-forward activation, exact GELU by default.
        - `drop_path`: the stochastic-depth rate of the last block (see
          [`DropPath`][eqx_vision.layers.DropPath]); 0 for none.
        - `attention`: the attention constructor.
        - `key`: a `jax.random.key` for the initialisation.
        - `**attention_options`: passed to every `Attention`
          (`talking_heads=True`, `fused_qkv=False`, ...).
        """

        def make_attn(*, key: PRNGKeyArray) -> Attention:
            return attention(
                dim,
                heads=heads,
                dim_head=dim_head,
                dropout=dropout,
                norm_eps=norm_eps,
                key=key,
                **attention_options,
            )

        def make_ff(*, key: PRNGKeyArray) -> FeedForward:
            return FeedForward(
                dim, mlp_dim, dropout=dropout, norm_eps=norm_eps, activation=activation, key=key
            )

        def make_block(index: int, *, key: PRNGKeyArray) -> TransformerBlock:
            attn_key, ff_key = jr.split(key)
            if num_branches == 1:
                attn, ff = make_attn(key=attn_key), make_ff(key=ff_key)
            else:
                attn = Parallel(make_attn, num_branches, key=attn_key)
                ff = Parallel(make_ff, num_branches, key=ff_key)
            if isinstance(layer_scale, bool):
                scale = layer_scale_init(index) if layer_scale else None
            else:
                scale = float(layer_scale)
            return TransformerBlock(attn, ff, layer_scale=scale, dim=dim)

        self.layers = Stack(make_block, depth, layer_dropout=layer_dropout, key=key)
        self.norm = LayerNorm(dim, eps=norm_eps) if final_norm else None
        self.drop_path = DropPath(drop_path)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx_seq dim"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: the tokens.
        - `context`: extra keys/values given to every block's attention.
        - `key`: needed only for dropout in training mode.
        """
        return self.forward_intermediates(x, context, key=key, intermediates=False)[0]

    def forward_intermediates(
        self,
        x: Float[Array, "seq dim"],
        context: Float[Array, "ctx_seq dim"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        intermediates: bool = True,
    ) -> tuple[Float[Array, "seq dim"], Float[Array, "depth seq dim"] | None]:
        """As `__call__`, and every block's output (before the final norm), stacked
        `(depth, seq, dim)`, out of the one scan over the blocks (`None` without
        `intermediates`)."""
        per_layer = None
        if key is not None and self.drop_path.active():
            per_layer = {"drop_path": self.drop_path.rates(self.layers.depth)}
        out = self.layers(x, context, key=key, per_layer=per_layer, intermediates=intermediates)
        x, outputs = out if intermediates else (out, None)
        return (x if self.norm is None else self.norm(x)), outputs

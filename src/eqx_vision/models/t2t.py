"""T2T-ViT: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet".

Yuan et al., 2021, https://arxiv.org/abs/2101.11986.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Linear,
    Transformer,
    check_image,
    check_key,
    pool_tokens,
    replace,
    resample_pos_embed,
    split_key,
    tokens_to_grid,
    unfold,
    with_class_tokens,
)
from ..layers._checks import NonEmpty, NonNegative, Positive, Rate, checked_arguments
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


def _t2t_grids(
    image_size: int, channels: int, t2t_layers: tuple[tuple[int, int], ...]
) -> tuple[list[int], list[int]]:
    """The token grid side and the token dimension after each tokens-to-token stage; a
    ValueError if a stage's window does not fit its grid."""
    grid_sizes, layer_dims = [], []
    side, layer_dim = image_size, channels
    for kernel, stride in t2t_layers:
        padded = side + 2 * (stride // 2)
        if padded < kernel:
            raise ValueError(
                f"t2t_layers: a {kernel}x{kernel} window does not fit the {side}x{side} "
                f"token grid (padded to {padded}) reached from image_size={image_size}; got "
                f"t2t_layers={t2t_layers!r}."
            )
        side = (padded - kernel) // stride + 1
        layer_dim *= kernel * kernel
        grid_sizes.append(side)
        layer_dims.append(layer_dim)
    return grid_sizes, layer_dims


class T2TViT(eqx.Module):
    """The Tokens-to-Token Vision Transformer.

    The image goes through a tokens-to-token module: at each of its stages, `kernel x
    kernel` windows with the stage's stride and padding `stride // 2` are flattened in
    `(c kh kw)` order into tokens of dimension `L` (the previous dimension times
    `kernel ** 2`), and, at every stage but the last, one transformer block runs over them
    (a single head of dimension `L`, feed-forward width `L`, final LayerNorm) before they
    are laid back on their square grid for the next stage. A Linear maps the last tokens to
    `dim`; a class token is prepended, learned position embeddings are added, and a ViT
    encoder (pre-norm blocks with a final LayerNorm) runs over the tokens. The class token
    (or the mean of all tokens) goes through a linear head.

    Equal to `vit_pytorch.t2t.T2TViT`; load its weights with `eqx_vision.from_vit_pytorch`.
    Reference behaviours reproduced:

    - The token vectors are ordered `(c kh kw)`, as `torch.nn.Unfold` gives them.
    - The tokens-to-token attention (one head with `dim_head = L`) has no output
      projection, and scales its scores by `L ** -0.5`.
    - The last tokens-to-token stage has no transformer, and `dropout` applies in the
      others too.
    - The main transformer ends with a LayerNorm and the head is a bare Linear.
    - With `pool="mean"` the class token is still prepended, and enters the mean.
    - Images are square, and so is the token grid of every stage.

    Deliberate difference: an image of any other size than `image_size` is rejected, where
    the reference silently adds the wrong position embeddings to a smaller one. The token
    grid sides after each tokens-to-token stage are in `grid_sizes`.
    """

    t2t_transformers: tuple[Transformer, ...]
    to_patch_embedding: Linear
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    transformer: Callable[..., Array]
    mlp_head: Linear | None
    image_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)
    t2t_layers: tuple[tuple[int, int], ...] = eqx.field(static=True)
    grid_sizes: tuple[int, ...] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        num_classes: NonNegative,
        dim: Positive,
        depth: Positive | None = None,
        heads: Positive | None = None,
        mlp_dim: Positive | None = None,
        pool: Literal["cls", "mean"] = "cls",
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        transformer: Callable[..., Array] | None = None,
        t2t_layers: Annotated[tuple[tuple[Positive, Positive], ...], NonEmpty()] = (
            (7, 4),
            (3, 2),
            (3, 2),
        ),
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width (square images).
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features).
        - `dim`: token dimension of the main transformer.
        - `depth`: number of blocks of the main transformer.
        - `heads`: attention heads per block of the main transformer.
        - `mlp_dim`: hidden width of the main transformer's feed-forward blocks.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of all tokens, class token
          included).
        - `channels`: input channels.
        - `dim_head`: dimension per attention head of the main transformer.
        - `dropout`: dropout rate inside every transformer, tokens-to-token ones included.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `transformer`: optionally, a module (or any callable) to use as the main
          transformer instead of building one from `depth`, `heads`, `mlp_dim` and
          `dim_head` (which are then ignored). It is called as
          `transformer(tokens, key=key)` on the `(seq, dim)` tokens, class token first,
          with `key` a `jax.random.key` or `None`, and must return an array of the same
          shape; this is checked here. `from_vit_pytorch` loads weights into it only if it
          is an `eqx_vision.layers.Transformer`, which stands for the reference's
          `vit_pytorch.vit.Transformer`.
        - `t2t_layers`: the `(kernel_size, stride)` of each tokens-to-token stage.
        - `key`: a `jax.random.key` for the initialisation.
        """
        size, layers = image_size, t2t_layers
        if transformer is None:
            missing = [
                name
                for name, value in (("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim))
                if value is None
            ]
            if missing:
                raise ValueError(
                    f"depth, heads and mlp_dim must be given when no transformer is; "
                    f"missing {', '.join(missing)}."
                )
        elif not callable(transformer):
            raise ValueError(f"transformer must be a callable; got {transformer!r}.")

        grid_sizes, layer_dims = _t2t_grids(size, channels, layers)
        layer_dim, seq = layer_dims[-1], grid_sizes[-1] ** 2 + 1

        t2t_key, embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 6)
        t2t_keys = jr.split(t2t_key, len(layers))
        self.t2t_transformers = tuple(
            Transformer(d, 1, 1, d, d, dropout=dropout, key=k)
            for d, k in zip(layer_dims[:-1], t2t_keys[:-1], strict=True)
        )
        self.to_patch_embedding = Linear(layer_dim, dim, key=embed_key)
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (seq, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        if transformer is None:
            assert depth is not None and heads is not None and mlp_dim is not None
            transformer = Transformer(
                dim, depth, heads, dim_head, mlp_dim, dropout=dropout, key=tf_key
            )
        else:
            _check_transformer(transformer, seq, dim)
        self.transformer = transformer
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = size
        self.channels = channels
        self.pool = pool
        self.t2t_layers = layers
        self.grid_sizes = tuple(grid_sizes)

    def soft_split(self, index: int, tokens: Float[Array, "..."]) -> Float[Array, "seq layer_dim"]:
        """Tokens-to-token stage `index`'s soft split: the previous stage's tokens laid back
        on their square grid (the image itself for the first stage), cut into overlapping
        windows flattened `(c kh kw)`."""
        kernel, stride = self.t2t_layers[index]
        if index > 0:
            tokens = tokens_to_grid(tokens)
        return unfold(tokens, kernel, stride, stride // 2)

    def _t2t(
        self, x: Float[Array, "channels height width"], keys: Sequence[PRNGKeyArray | None]
    ) -> list[Float[Array, "seq layer_dim"]]:
        """The tokens after each tokens-to-token stage (its transformer, if it has one)."""
        outputs, tokens = [], x
        for i in range(len(self.t2t_layers)):
            tokens = self.soft_split(i, tokens)
            if i < len(self.t2t_transformers):
                tokens = self.t2t_transformers[i](tokens, key=keys[i])
            outputs.append(tokens)
        return outputs

    def embed(
        self, tokens: Float[Array, "seq layer_dim"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq+1 dim"]:
        """The main transformer's input from the last tokens-to-token stage's tokens: the
        Linear embedding, the class token, the position embeddings and the embedding
        dropout (with `key`)."""
        tokens = self.to_patch_embedding(tokens)
        tokens = with_class_tokens(tokens, self.cls_token, self.pos_embedding)
        return self.dropout(tokens, key=key)

    @property
    def _blocks(self) -> int:
        """The blocks of the main transformer that `forward_intermediates` returns (none
        for a custom transformer)."""
        return self.transformer.layers.depth if isinstance(self.transformer, Transformer) else 0

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the tokens after each tokens-to-token
        stage with a transformer (`t2t_transformers[i]`, `(layer_dim, grid, grid)` maps),
        then the tokens after each block of the main transformer (`(dim, grid, grid)` maps
        of the last grid, the class token apart); none of the main transformer's if it is
        a custom one. The reduction is `image_size // grid`."""
        infos = []
        _, layer_dims = _t2t_grids(self.image_size, self.channels, self.t2t_layers)
        for i in range(len(self.t2t_transformers)):
            r = self.image_size // self.grid_sizes[i]
            infos.append(FeatureInfo(i, f"t2t_transformers[{i}]", layer_dims[i], (r, r)))
        dim, r = self.cls_token.shape[1], self.image_size // self.grid_sizes[-1]
        n = len(infos)
        infos += [
            FeatureInfo(n + j, f"transformer.layers[{j}]", dim, (r, r)) for j in range(self._blocks)
        ]
        return tuple(infos)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the main transformer's output tokens `(1 + grid ** 2, dim)`, the class
        token first, after its final LayerNorm.
        """
        check_image(x, (self.channels, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, tf_key, *t2t_keys = split_key(key, 2 + len(self.t2t_transformers))
        tokens = self.embed(self._t2t(x, t2t_keys)[-1], key=emb_key)
        return self.transformer(tokens, key=tf_key)

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the class token
        (`pool="cls"`) or the mean of all the tokens, `(dim,)`.
        """
        pooled = pool_tokens(x, self.pool)
        if pre_logits or self.mlp_head is None:
            return pooled
        return self.mlp_head(pooled)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        prefix_tokens: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features, and the tokens after chosen tokens-to-token stages and
        blocks of the main transformer (see `feature_info`).

        **Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `indices`: which outputs: `None` for all, an int `n` for the last `n`, or a
          sequence of indices (negative from the end).
        - `norm`: apply the main transformer's final norm to its blocks' outputs (the
          tokens-to-token stages end with their own norm already).
        - `output_fmt`: `"map"` for `(channels, grid, grid)` maps, `"tokens"` for the
          tokens `(grid ** 2, channels)`.
        - `prefix_tokens`: return each output of the main transformer as `(patch output,
          class token (1, dim))`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The main
        transformer's blocks run in their scanned stack.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        n_t2t = len(self.t2t_transformers)
        chosen = feature_indices(indices, n_t2t + self._blocks, name)
        check_image(x, (self.channels, self.image_size, self.image_size), name)
        check_key(self, key)
        emb_key, tf_key, *t2t_keys = split_key(key, 2 + n_t2t)
        t2t = self._t2t(x, t2t_keys)
        tokens = self.embed(t2t[-1], key=emb_key)
        stacked = None
        if isinstance(self.transformer, Transformer):
            final, stacked = self.transformer.forward_intermediates(tokens, key=tf_key)
        else:
            final = self.transformer(tokens, key=tf_key)
        outputs = []
        for i in chosen:
            if i < n_t2t:
                y = t2t[i]
                outputs.append(tokens_to_grid(y) if output_fmt == "map" else y)
                continue
            assert stacked is not None and isinstance(self.transformer, Transformer)
            y = stacked[i - n_t2t]
            if norm and self.transformer.norm is not None:
                y = self.transformer.norm(y)
            prefix, y = y[:1], y[1:]
            if output_fmt == "map":
                y = tokens_to_grid(y)
            outputs.append((y, prefix) if prefix_tokens else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "T2TViT":
        """This model for `(size, size)` images (square, as the model takes them): the
        grids recomputed and the patch position embeddings resampled, the class token's
        kept (see [`set_image_size`][eqx_vision.set_image_size]). A custom main transformer
        is checked on the new number of tokens."""
        height, width = (int(n) for n in image_size)
        if height != width:
            raise ValueError(f"T2TViT takes square images; got image_size {(height, width)}.")
        if height == self.image_size:
            return self
        grid_sizes, _ = _t2t_grids(height, self.channels, self.t2t_layers)
        new, old = grid_sizes[-1], self.grid_sizes[-1]
        pos = resample_pos_embed(self.pos_embedding, (new, new), (old, old), num_prefix=1)
        if not isinstance(self.transformer, Transformer):
            _check_transformer(self.transformer, new * new + 1, pos.shape[1])
        return replace(self, pos_embedding=pos, image_size=height, grid_sizes=tuple(grid_sizes))

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "T2TViT":
        """This model with a new classifier of `num_classes` outputs, or none for `0` (see
        [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.cls_token.shape[1], num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the pooled
        features `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))


def _check_transformer(transformer: Callable[..., Array], seq: int, dim: int) -> None:
    """Trace a custom main transformer on abstract `(seq, dim)` tokens and check its output."""
    tokens = jax.ShapeDtypeStruct((seq, dim), jnp.float32)
    try:
        out = eqx.filter_eval_shape(
            lambda m, t: m(t, key=jr.key(0)),
            transformer,
            tokens,
        )
    except Exception as error:
        raise ValueError(
            f"transformer must map (seq, dim) = {(seq, dim)} tokens to the same shape when "
            f"called as transformer(tokens, key=key); calling it failed: {error}"
        ) from error
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != (seq, dim):
        raise ValueError(
            f"transformer must map (seq, dim) = {(seq, dim)} tokens to the same shape; "
            f"it returned {shape if shape is not None else type(out).__name__}."
        )

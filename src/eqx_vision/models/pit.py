"""PiT: "Rethinking Spatial Dimensions of Vision Transformers".

Heo et al., 2021, https://arxiv.org/abs/2103.16302.
"""

from collections.abc import Sequence
from typing import Annotated, Any, cast

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    Conv2d,
    DepthwiseConv2d,
    LayerNorm,
    Linear,
    Transformer,
    check_image,
    check_key,
    grid_to_tokens,
    replace,
    resample_pos_embed,
    split_key,
    tokens_to_grid,
    unfold,
)
from ..layers._checks import (
    Minimum,
    NonEmpty,
    NonNegative,
    PerStage,
    Positive,
    Rate,
    checked_arguments,
)
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


class PiTPool(eqx.Module):
    """PiT's pooling layer between stages: halves the token grid and widens the dimension.

    The prefix tokens (the class token, and the distillation token if any) go through
    `Linear(dim, out_dim)`. The other tokens are laid out on their square grid and go
    through a depthwise `3x3` convolution with stride 2, padding 1 and `out_dim // dim`
    output channels per input channel (output channel `o` reads input channel
    `o // (out_dim // dim)`), then, with `pointwise=True`, a pointwise `1x1` convolution;
    all have biases.
    """

    depthwise: DepthwiseConv2d
    pointwise: Conv2d | None
    cls_ff: Linear

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        *,
        pointwise: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension in.
        - `out_dim`: token dimension out, a multiple of `dim`; `2 * dim` by default.
        - `pointwise`: whether the depthwise convolution is followed by a `1x1` one
          (vit-pytorch's pooling; timm's has none).
        - `key`: a `jax.random.key` for the initialisation.
        """
        out_dim = 2 * dim if out_dim is None else out_dim
        if dim <= 0 or out_dim <= 0 or out_dim % dim:
            raise ValueError(
                f"PiTPool needs out_dim to be a positive multiple of dim; got dim={dim}, "
                f"out_dim={out_dim}."
            )
        dw_key, pw_key, cls_key = jr.split(key, 3)
        self.depthwise = DepthwiseConv2d(
            dim, 3, stride=2, padding=1, multiplier=out_dim // dim, key=dw_key
        )
        self.pointwise = Conv2d(out_dim, out_dim, 1, key=pw_key) if pointwise else None
        self.cls_ff = Linear(dim, out_dim, key=cls_key)

    def __call__(
        self, x: Float[Array, "seq dim"], num_prefix: int = 1
    ) -> Float[Array, "out_seq out_dim"]:
        """**Arguments:**

        - `x`: `num_prefix` prefix tokens followed by a square grid of `s * s` tokens,
          row-major.
        - `num_prefix`: the number of prefix tokens.

        **Returns:** `(num_prefix + ceil(s / 2) ** 2, out_dim)`.
        """
        prefix, tokens = x[:num_prefix], x[num_prefix:]
        grid = self.depthwise(tokens_to_grid(tokens))
        if self.pointwise is not None:
            grid = self.pointwise(grid)
        return jnp.concatenate([self.cls_ff(prefix), grid_to_tokens(grid)], axis=0)


def _stage_dims(dim: int | tuple[int, ...], num_stages: int) -> tuple[int, ...]:
    """The token dimension of every stage: `dim` doubled at every pooling layer, or the
    tuple given, each a multiple of the one before."""
    if isinstance(dim, int):
        return tuple(dim * 2**i for i in range(num_stages))
    if len(dim) != num_stages:
        raise ValueError(
            f"PiT: dim must be an int or a tuple of one int per stage (len(depth) = "
            f"{num_stages}); got {dim!r}."
        )
    for before, after in zip(dim, dim[1:], strict=False):
        if after % before:
            raise ValueError(
                "PiT: each stage's dim must be a multiple of the one before (the pooling "
                f"is a depthwise convolution); got dim={dim!r}."
            )
    return dim


def _grid_sizes(
    image_size: int, patch_size: int, stride: int | None, num_stages: int
) -> tuple[int, ...]:
    """The side of the token grid of every stage (the patch windows are checked here)."""
    if stride is None and image_size % patch_size:
        raise ValueError(
            f"image_size must be divisible by patch_size; got image_size={image_size} and "
            f"patch_size={patch_size}."
        )
    if patch_size > image_size:
        raise ValueError(
            f"patch_size must be at most image_size; got image_size={image_size} and "
            f"patch_size={patch_size}."
        )
    step = patch_size // 2 if stride is None else stride
    sizes = [(image_size - patch_size) // step + 1]
    for _ in range(num_stages - 1):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return tuple(sizes)


class PiT(eqx.Module):
    """The Pooling-based Vision Transformer.

    Overlapping `patch_size` windows with stride `patch_size // 2` (no padding) are
    flattened in `(c kh kw)` order and embedded by a Linear; a class token is prepended and
    learned position embeddings are added. Stages of pre-norm transformer blocks follow,
    separated by `PiTPool` layers, each of which halves the side of the token grid (rounding
    up) and doubles the token dimension. The class token goes through
    `LayerNorm → Linear`.

    Equal to `vit_pytorch.pit.PiT` with the default options; load its weights with
    `eqx_vision.from_vit_pytorch`. Reference behaviours reproduced:

    - The patch vectors are ordered `(c kh kw)`, as `torch.nn.Unfold` gives them, not
      `(kh kw c)`.
    - `dim_head` and `mlp_dim` stay the same in every stage while the dimension doubles.
    - The stages have no final LayerNorm; the head's LayerNorm is the only one after them.
    - An attention block with `heads == 1` and `dim_head` equal to its stage's dimension
      has no output projection.
    - `image_size` must be divisible by `patch_size`, although the windows do not need it.
    - Images and patches are square; the token grid of every stage is square.

    The options cover timm's `PoolingVisionTransformer` (the `pit_*` names; load them with
    `eqx_vision.from_timm`): a patch stride of its own, one dimension, head dimension and
    MLP width per stage, biases in the qkv projection and an output projection in every
    block, the LayerNorm epsilon, a pooling layer without the `1x1` convolution, position
    embeddings on the patch tokens only, and a distillation token with a head of its own.

    Deliberate difference: an image of any other size than `image_size` is rejected, where
    the reference silently adds the wrong position embeddings to a smaller one. The token
    grid sides of the stages are in `grid_sizes`.
    """

    to_patch_embedding: Linear
    cls_token: Float[Array, "1 dim"]
    dist_token: Float[Array, "1 dim"] | None
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    stages: tuple[Transformer, ...]
    pools: tuple[PiTPool, ...]
    head_norm: LayerNorm
    mlp_head: Linear | None
    dist_head: Linear | None
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    grid_sizes: tuple[int, ...] = eqx.field(static=True)
    pos_embed_prefix: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Annotated[int, Minimum(2)],
        num_classes: NonNegative,
        dim: Positive | tuple[Positive, ...],
        depth: Annotated[tuple[Positive, ...], NonEmpty()],
        heads: Annotated[Positive | tuple[Positive, ...], PerStage("len(depth)")],
        mlp_dim: Annotated[Positive | tuple[Positive, ...], PerStage("len(depth)")],
        dim_head: Annotated[Positive | tuple[Positive, ...], PerStage("len(depth)")] = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        channels: Positive = 3,
        stride: Positive | None = None,
        qkv_bias: bool = False,
        project_out: bool | None = None,
        norm_eps: float = 1e-5,
        pool_pointwise: bool = True,
        pos_embed_prefix: bool = True,
        distillation_token: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width (square images).
        - `patch_size`: side of the square patch windows, at least 2; the windows overlap
          with stride `patch_size // 2`. Must divide `image_size`.
        - `num_classes`: number of output logits; `0` for no classifier (the model then
          returns the normalised class token).
        - `dim`: token dimension of the first stage; it doubles at every pooling layer. Or a
          tuple of one dimension per stage, each a multiple of the one before.
        - `depth`: a tuple with the number of transformer blocks of each stage.
        - `heads`: attention heads per block, one int for every stage or a tuple with one
          per stage.
        - `mlp_dim`: hidden width of the feed-forward blocks, one int for every stage or a
          tuple with one per stage.
        - `dim_head`: dimension per attention head, one int for every stage or a tuple with
          one per stage.
        - `dropout`: dropout rate inside the transformer blocks.
        - `emb_dropout`: dropout rate on the embedded tokens (those the position embeddings
          are added to).
        - `channels`: input channels.

        The variants (the defaults are vit-pytorch's):

        - `stride`: the stride of the patch windows, `patch_size // 2` by default; when
          given, `image_size` need not be a multiple of `patch_size`.
        - `qkv_bias`: whether the query/key/value projections have a bias.
        - `project_out`: whether every attention block has an output projection; by
          default all but those with `heads == 1` and `dim_head` equal to the dimension.
        - `norm_eps`: the epsilon of every LayerNorm.
        - `pool_pointwise`: whether the pooling layers end with a `1x1` convolution.
        - `pos_embed_prefix`: whether the position embeddings cover the class (and
          distillation) token; otherwise they are added to the patch tokens only.
        - `distillation_token`: a second prefix token with a head of its own (DeiT); the
          logits are the mean of both heads.
        - `key`: a `jax.random.key` for the initialisation.
        """
        depths = depth
        num_stages = len(depths)
        dims = _stage_dims(cast(Any, dim), num_stages)
        grid_sizes = _grid_sizes(image_size, patch_size, stride, num_stages)
        grid = grid_sizes[0]
        num_prefix = 1 + int(distillation_token)
        keys = jr.split(key, 8)
        stage_keys = jr.split(keys[3], num_stages)
        pool_keys = jr.split(keys[4], num_stages)
        self.to_patch_embedding = Linear(channels * patch_size**2, dims[0], key=keys[0])
        self.cls_token = normal(keys[1], (1, dims[0]))
        self.dist_token = normal(keys[6], (1, dims[0])) if distillation_token else None
        seq = grid * grid + (num_prefix if pos_embed_prefix else 0)
        self.pos_embedding = normal(keys[2], (seq, dims[0]))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.stages = tuple(
            Transformer(
                dims[i],
                depths[i],
                cast(tuple[int, ...], heads)[i],
                cast(tuple[int, ...], dim_head)[i],
                cast(tuple[int, ...], mlp_dim)[i],
                dropout=dropout,
                final_norm=False,
                norm_eps=norm_eps,
                qkv_bias=qkv_bias,
                project_out=project_out,
                key=stage_keys[i],
            )
            for i in range(num_stages)
        )
        self.pools = tuple(
            PiTPool(dims[i], dims[i + 1], pointwise=pool_pointwise, key=pool_keys[i])
            for i in range(num_stages - 1)
        )
        self.head_norm = LayerNorm(dims[-1], eps=norm_eps)
        self.mlp_head = Linear(dims[-1], num_classes, key=keys[5]) if num_classes else None
        self.dist_head = (
            Linear(dims[-1], num_classes, key=keys[7])
            if num_classes and distillation_token
            else None
        )
        self.image_size = image_size
        self.patch_size = patch_size
        self.stride = patch_size // 2 if stride is None else stride
        self.channels = channels
        self.grid_sizes = grid_sizes
        self.pos_embed_prefix = pos_embed_prefix

    def _prefix(self, dtype: Any) -> Float[Array, "num_prefix dim"]:
        """The class token, then the distillation token if any, in `dtype`."""
        parts = [p for p in (self.cls_token, self.dist_token) if p is not None]
        return jnp.concatenate([p.astype(dtype) for p in parts], axis=0)

    @property
    def num_prefix_tokens(self) -> int:
        """The class token, and the distillation token if any."""
        return 1 if self.dist_token is None else 2

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the patch tokens after each stage (before
        its pooling layer), as `(dim_i, grid_sizes[i], grid_sizes[i])` maps. The reduction
        is `stride * 2 ** i`, as timm gives it; with overlapping windows
        (`stride < patch_size`) the grid has `grid_sizes[i]` cells a side, about
        `image_size / reduction` (a cell or so fewer)."""
        dims = [self.pos_embedding.shape[1]] + [p.cls_ff.weight.shape[0] for p in self.pools]
        return tuple(
            FeatureInfo(i, f"stages[{i}]", dims[i], (self.stride * 2**i, self.stride * 2**i))
            for i in range(len(self.stages))
        )

    def _embed(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None
    ) -> Float[Array, "seq dim"]:
        """The first stage's input: prefix tokens, patch embeddings, position embeddings,
        dropout."""
        patches = self.to_patch_embedding(unfold(x, self.patch_size, self.stride))
        prefix = self._prefix(patches.dtype)
        pos = self.pos_embedding.astype(patches.dtype)
        if self.pos_embed_prefix:
            return self.dropout(jnp.concatenate([prefix, patches], axis=0) + pos, key=key)
        return jnp.concatenate([prefix, self.dropout(patches + pos, key=key)], axis=0)

    def _forward(
        self, x: Float[Array, "channels height width"], key: PRNGKeyArray | None
    ) -> tuple[Float[Array, "seq dim"], list[Array]]:
        check_image(x, (self.channels, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, *stage_keys = split_key(key, 1 + len(self.stages))
        tokens = self._embed(x, emb_key)
        outputs = []
        for i, stage in enumerate(self.stages):
            tokens = stage(tokens, key=stage_keys[i])
            outputs.append(tokens)
            if i < len(self.pools):
                tokens = self.pools[i](tokens, self.num_prefix_tokens)
        return tokens, outputs

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the last stage's tokens `(seq, dim)`, the prefix tokens (class, then
        distillation) first, before the head's norm.
        """
        return self._forward(x, key)[0]

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits (the mean of both heads' with a distillation token), or,
        with `pre_logits` or without a head, the normalised class token (with a
        distillation token, the mean of both normalised tokens).
        """
        pooled = self.head_norm(x[: self.num_prefix_tokens])
        if pre_logits or self.mlp_head is None:
            return pooled.mean(axis=0)
        logits = self.mlp_head(pooled[0])
        if self.dist_head is not None:
            logits = (logits + self.dist_head(pooled[1])) / 2
        return logits

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
        """The final features and the patch tokens after chosen stages.

        **Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `indices`: which stages (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of stage indices (negative from the end).
        - `norm`: accepted for the common signature; as in timm, the head's norm is never
          applied to the stage outputs (it is sized for the last stage's prefix tokens).
        - `output_fmt`: `"map"` for `(dim_i, grid, grid)` maps, `"tokens"` for the patch
          tokens `(grid * grid, dim_i)`.
        - `prefix_tokens`: return each output as `(patch output, prefix tokens)`, the prefix
          tokens `(num_prefix, dim_i)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`.
        """
        del norm
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, len(self.stages), name)
        final, stage_outputs = self._forward(x, key)
        n = self.num_prefix_tokens
        outputs = []
        for i in chosen:
            prefix, y = stage_outputs[i][:n], stage_outputs[i][n:]
            if output_fmt == "map":
                y = tokens_to_grid(y, self.grid_sizes[i])
            outputs.append((y, prefix) if prefix_tokens else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "PiT":
        """This model for `(size, size)` images (PiT's are square): the position embeddings
        of the patches resampled (see [`set_image_size`][eqx_vision.set_image_size]);
        the patch windows must fit as the constructor requires."""
        if image_size[0] != image_size[1]:
            raise ValueError(f"PiT takes square images; got image_size {tuple(image_size)}.")
        size = int(image_size[0])
        if size == self.image_size:
            return self
        given = None if self.stride == self.patch_size // 2 else self.stride
        grids = _grid_sizes(size, self.patch_size, given, len(self.stages))
        prefix = self.num_prefix_tokens if self.pos_embed_prefix else 0
        old = (self.grid_sizes[0], self.grid_sizes[0])
        pos = resample_pos_embed(self.pos_embedding, (grids[0], grids[0]), old, num_prefix=prefix)
        return replace(self, pos_embedding=pos, image_size=size, grid_sizes=grids)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "PiT":
        """This model with a new classifier (and distillation head, if it has a
        distillation token) of `num_classes` outputs, or none for `0` (see
        [`reset_head`][eqx_vision.reset_head])."""
        dim = self.head_norm.weight.shape[0]
        head = dist = None
        if num_classes > 0:
            assert key is not None
            head_key, dist_key = jr.split(key)
            head = Linear(dim, num_classes, key=head_key)
            if self.dist_token is not None:
                dist = Linear(dim, num_classes, key=dist_key)
        return eqx.tree_at(
            lambda m: (m.mlp_head, m.dist_head), self, (head, dist), is_leaf=lambda n: n is None
        )

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)` (with `num_classes=0`, the normalised
        class token, or the mean of the normalised class and distillation tokens):
        `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))

"""PiT: "Rethinking Spatial Dimensions of Vision Transformers".

Heo et al., 2021, https://arxiv.org/abs/2103.16302.
"""

from typing import Annotated, cast

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
    split_key,
    tokens_to_grid,
    unfold,
    with_class_tokens,
)
from ..layers._checks import Minimum, NonEmpty, PerStage, Positive, Rate, checked_arguments
from ..layers._init import normal


class PiTPool(eqx.Module):
    """PiT's pooling layer between stages: halves the token grid and doubles the dimension.

    The class token goes through `Linear(dim, 2 dim)`. The other tokens are laid out on
    their square grid and go through a depthwise `3x3` convolution with stride 2, padding 1
    and two output channels per input channel (output channels `2i` and `2i + 1` read input
    channel `i`), then a pointwise `1x1` convolution; both have biases.
    """

    depthwise: DepthwiseConv2d
    pointwise: Conv2d
    cls_ff: Linear

    def __init__(self, dim: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: token dimension in; the output has `2 * dim`.
        - `key`: a `jax.random.key` for the initialisation.
        """
        dw_key, pw_key, cls_key = jr.split(key, 3)
        self.depthwise = DepthwiseConv2d(dim, 3, stride=2, padding=1, multiplier=2, key=dw_key)
        self.pointwise = Conv2d(2 * dim, 2 * dim, 1, key=pw_key)
        self.cls_ff = Linear(dim, 2 * dim, key=cls_key)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "out_seq out_dim"]:
        """**Arguments:**

        - `x`: the class token followed by a square grid of `s * s` tokens, row-major.

        **Returns:** `(1 + ceil(s / 2) ** 2, 2 * dim)`.
        """
        cls, tokens = x[:1], x[1:]
        grid = self.pointwise(self.depthwise(tokens_to_grid(tokens)))
        return jnp.concatenate([self.cls_ff(cls), grid_to_tokens(grid)], axis=0)


class PiT(eqx.Module):
    """The Pooling-based Vision Transformer.

    Overlapping `patch_size` windows with stride `patch_size // 2` (no padding) are
    flattened in `(c kh kw)` order and embedded by a Linear; a class token is prepended and
    learned position embeddings are added. Stages of pre-norm transformer blocks follow,
    separated by `PiTPool` layers, each of which halves the side of the token grid (rounding
    up) and doubles the token dimension. The class token goes through
    `LayerNorm → Linear`.

    Equal to `vit_pytorch.pit.PiT`; load its weights with `eqx_vision.from_vit_pytorch`.
    Reference behaviours reproduced:

    - The patch vectors are ordered `(c kh kw)`, as `torch.nn.Unfold` gives them, not
      `(kh kw c)`.
    - `dim_head` and `mlp_dim` stay the same in every stage while the dimension doubles.
    - The stages have no final LayerNorm; the head's LayerNorm is the only one after them.
    - An attention block with `heads == 1` and `dim_head` equal to its stage's dimension
      has no output projection.
    - `image_size` must be divisible by `patch_size`, although the windows do not need it.
    - Images and patches are square; the token grid of every stage is square.

    Deliberate difference: an image of any other size than `image_size` is rejected, where
    the reference silently adds the wrong position embeddings to a smaller one. The token
    grid sides of the stages are in `grid_sizes`.
    """

    to_patch_embedding: Linear
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    stages: tuple[Transformer, ...]
    pools: tuple[PiTPool, ...]
    head_norm: LayerNorm
    mlp_head: Linear
    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    grid_sizes: tuple[int, ...] = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Annotated[int, Minimum(2)],
        num_classes: Positive,
        dim: Positive,
        depth: Annotated[tuple[Positive, ...], NonEmpty()],
        heads: Annotated[Positive | tuple[Positive, ...], PerStage("len(depth)")],
        mlp_dim: Positive,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        channels: Positive = 3,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width (square images).
        - `patch_size`: side of the square patch windows, at least 2; the windows overlap
          with stride `patch_size // 2`. Must divide `image_size`.
        - `num_classes`: number of output logits.
        - `dim`: token dimension of the first stage; it doubles at every pooling layer.
        - `depth`: a tuple with the number of transformer blocks of each stage.
        - `heads`: attention heads per block, one int for every stage or a tuple with one
          per stage.
        - `mlp_dim`: hidden width of the feed-forward blocks, the same in every stage.
        - `dim_head`: dimension per attention head, the same in every stage.
        - `dropout`: dropout rate inside the transformer blocks.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        size, patch = image_size, patch_size
        if size % patch:
            raise ValueError(
                f"image_size must be divisible by patch_size; got image_size={size} and "
                f"patch_size={patch}."
            )
        depths = depth
        stage_heads = cast(tuple[int, ...], heads)  # one per stage, from checked_arguments

        grid = (size - patch) // (patch // 2) + 1
        grid_sizes = [grid]
        for _ in depths[1:]:
            grid_sizes.append((grid_sizes[-1] - 1) // 2 + 1)

        embed_key, cls_key, pos_key, stage_key, pool_key, head_key = jr.split(key, 6)
        stage_keys = jr.split(stage_key, len(depths))
        pool_keys = jr.split(pool_key, len(depths))
        self.to_patch_embedding = Linear(channels * patch * patch, dim, key=embed_key)
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid * grid + 1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        stages, pools = [], []
        stage_dim = dim
        for i, (stage_depth, h) in enumerate(zip(depths, stage_heads, strict=True)):
            stages.append(
                Transformer(
                    stage_dim,
                    stage_depth,
                    h,
                    dim_head,
                    mlp_dim,
                    dropout=dropout,
                    final_norm=False,
                    key=stage_keys[i],
                )
            )
            if i < len(depths) - 1:
                pools.append(PiTPool(stage_dim, key=pool_keys[i]))
                stage_dim *= 2
        self.stages = tuple(stages)
        self.pools = tuple(pools)
        self.head_norm = LayerNorm(stage_dim)
        self.mlp_head = Linear(stage_dim, num_classes, key=head_key)
        self.image_size = size
        self.patch_size = patch
        self.channels = channels
        self.grid_sizes = tuple(grid_sizes)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits, `(num_classes,)`.
        """
        check_image(x, (self.channels, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, *stage_keys = split_key(key, 1 + len(self.stages))
        tokens = self.to_patch_embedding(unfold(x, self.patch_size, self.patch_size // 2))
        tokens = with_class_tokens(tokens, self.cls_token, self.pos_embedding)
        tokens = self.dropout(tokens, key=emb_key)
        for i, stage in enumerate(self.stages):
            tokens = stage(tokens, key=stage_keys[i])
            if i < len(self.pools):
                tokens = self.pools[i](tokens)
        return self.mlp_head(self.head_norm(tokens[0]))

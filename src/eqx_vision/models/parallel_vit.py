"""Parallel ViT: "Three things everyone should know about Vision Transformers".

Touvron et al., 2022, https://arxiv.org/abs/2203.09795.
"""

from collections.abc import Callable
from typing import Literal, TypeVar

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..interop import StateDict, register
from ..interop._vit_pytorch import (
    convert_attention,
    convert_block,
    convert_feedforward,
    convert_layernorm,
    convert_linear,
    convert_parallel,
    convert_patch_embedding,
    convert_transformer,
)
from ..layers import (
    AbstractClassTokenViT,
    LayerNorm,
    Linear,
    Parallel,
    PatchEmbedding,
    Transformer,
    TransformerBlock,
    check_divisible,
    pair,
)
from ..layers._checks import checked_arguments
from ..layers._init import normal


class ParallelViT(AbstractClassTokenViT):
    """The Vision Transformer with parallel residual branches.

    Each layer sums `num_parallel_branches` independent attention blocks applied to the same
    input, `x = x + Σ_b attn_b(x)`, then as many feed-forward blocks,
    `x = x + Σ_b ff_b(x)`: a shallower, wider network with the same number of blocks. The
    branches of a layer are stored stacked and evaluated together.

    The image is cut into patches, each flattened in `(p1 p2 c)` order and embedded by a
    single Linear (no LayerNorm before or after it); a class token is prepended, learned
    position embeddings are added, and the pre-norm parallel transformer runs over the
    tokens. The class token (or the mean of all tokens) goes through `LayerNorm → Linear`.

    Equal to `vit_pytorch.parallel_vit.ViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. The reference details reproduced:

    - the encoder has no final LayerNorm; the head has one instead;
    - the attention output projection is dropped when `heads == 1` and `dim_head == dim`;
    - the class token exists for both pools, so `pool="mean"` averages it with the patch
      tokens;
    - the vit-pytorch position embedding and class token have a leading axis of 1, which is
      dropped here: `pos_embedding` is `(num_patches + 1, dim)`, `cls_token` is `(1, dim)`.

    Unlike the reference, which silently adds the wrong position embeddings to a smaller
    image, an image of any other size than `image_size` is rejected.
    """

    to_patch_embedding: PatchEmbedding
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: Literal["cls", "mean"] = "cls",
        num_parallel_branches: int = 2,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`.
        - `num_classes`: number of output logits, at least 1.
        - `dim`: token dimension.
        - `depth`: number of layers, each with its parallel attention and feed-forward
          branches.
        - `heads`: attention heads per attention branch.
        - `mlp_dim`: hidden width of the feed-forward branches.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of all tokens, class token
          included).
        - `num_parallel_branches`: attention and feed-forward branches per layer, at least 1.
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside every branch.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `key`: a `jax.random.key` for the initialisation.
        """
        image_hw = pair(image_size, "image_size")
        patch_hw = pair(patch_size, "patch_size")
        grid = check_divisible(image_hw, patch_hw)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}.")
        if num_parallel_branches < 1:
            raise ValueError(f"num_parallel_branches must be >= 1; got {num_parallel_branches}.")
        embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 5)
        self.to_patch_embedding = PatchEmbedding(
            channels, patch_hw, dim, pre_norm=False, post_norm=False, key=embed_key
        )
        self.cls_token = normal(cls_key, (1, dim))
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1] + 1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.transformer = Transformer(
            dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            dropout=dropout,
            final_norm=False,
            num_branches=num_parallel_branches,
            key=tf_key,
        )
        self.head_norm = LayerNorm(dim)
        self.mlp_head = Linear(dim, num_classes, key=head_key)
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool


B = TypeVar("B", bound=eqx.Module)


def _convert_branches(
    m: B | Parallel[B], sd: StateDict, prefix: str, convert: Callable[[B, StateDict, str], B]
) -> B | Parallel[B]:
    """Branches stored as `{prefix}fns.{b}.`; a single branch is a plain module here."""
    if isinstance(m, Parallel):
        return convert_parallel(m, sd, prefix, convert)
    return convert(m, sd, prefix + "fns.0.")


def _convert_block(m: TransformerBlock, sd: StateDict, prefix: str) -> TransformerBlock:
    return convert_block(
        m,
        sd,
        prefix,
        attn=lambda a, sd, p: _convert_branches(a, sd, p, convert_attention),
        ff=lambda f, sd, p: _convert_branches(f, sd, p, convert_feedforward),
    )


@register(ParallelViT)
def _from_vit_pytorch(model: ParallelViT, sd: StateDict) -> ParallelViT:
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            convert_transformer(model.transformer, sd, "transformer.", block=_convert_block),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_linear(model.mlp_head, sd, "mlp_head.1."),
        ),
    )

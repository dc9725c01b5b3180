"""ViT for small datasets: "Vision Transformer for Small-Size Datasets".

Lee, Lee and Song, 2021, https://arxiv.org/abs/2112.13492.

Two add-ons that give a ViT the locality bias it lacks when trained from scratch on small
datasets: Shifted Patch Tokenization (`SPT`), which embeds each patch together with its
one-pixel-shifted neighbours, and Locality Self-Attention (`LSA`), attention with a learned
temperature and without each token's score with itself.
"""

from typing import Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    AbstractClassTokenViT,
    Attention,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
)
from ..layers._checks import NonNegative, Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal


class LSA(Attention):
    """Locality Self-Attention: pre-norm multi-head self-attention with a learned temperature.

    The scores are scaled by `exp(t)`, with the scalar `t` learned and initialised to
    `log(dim_head^-1/2)`, and each token's score with itself is set to `-finfo.max` before
    the softmax, so a token attends only to the others. This is the shared `Attention` with
    `locality=True` (and, as in the reference, an output projection in every case).
    """

    @checked_arguments
    def __init__(
        self,
        dim: Positive,
        *,
        heads: Positive = 8,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        norm_eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension, in and out.
        - `heads`: number of attention heads.
        - `dim_head`: dimension of each head's queries, keys and values.
        - `dropout`: dropout rate on the attention probabilities and on the output.
        - `norm_eps`: the epsilon of the input LayerNorm.
        - `key`: a `jax.random.key` for the initialisation.
        """
        super().__init__(
            dim,
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
            norm_eps=norm_eps,
            project_out=True,
            locality=True,
            key=key,
        )


def shift_image(
    x: Float[Array, "channels height width"], dy: int, dx: int
) -> Float[Array, "channels height width"]:
    """`x` moved by `dy` rows and `dx` columns (each -1, 0 or 1), zero-filled at the edge.

    The same as `F.pad(x, (dx, -dx, dy, -dy))` in PyTorch: a positive `dx` moves the image
    right, a positive `dy` moves it down.
    """
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, [(0, 0, 0), (dy, -dy, 0), (dx, -dx, 0)])


class SPT(eqx.Module):
    """Shifted Patch Tokenization.

    The image and four copies of it shifted by one pixel (right, left, down, up; zero
    filled) are stacked on the channel axis, `5 * channels` channels in all; the result is
    cut into `patch_size × patch_size` patches, each flattened in `(p1 p2 c)` order, then
    `LayerNorm → Linear` embeds them.

    Equal to `vit_pytorch.vit_for_small_dataset.SPT`; load its weights with
    `eqx_vision.from_vit_pytorch`.
    """

    to_patch_tokens: PatchEmbedding
    patch_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self, *, dim: Positive, patch_size: Positive, channels: Positive = 3, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `dim`: the token dimension.
        - `patch_size`: height and width of a patch, an int.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        self.to_patch_tokens = PatchEmbedding(
            5 * channels, (patch_size, patch_size), dim, post_norm=False, key=key
        )
        self.patch_size = patch_size
        self.channels = channels

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "num_patches dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with height and width multiples of
          `patch_size`.

        **Returns:** the patch tokens `(num_patches, dim)`, patches in row-major order.
        """
        p = self.patch_size
        check_image(x, (self.channels, None, None), "SPT")
        height, width = x.shape[1:]
        if height % p or width % p:
            raise ValueError(
                f"SPT needs an image whose height and width are multiples of patch_size={p}; "
                f"got shape {tuple(x.shape)}."
            )
        shifts = ((0, 1), (0, -1), (1, 0), (-1, 0))  # right, left, down, up
        x = jnp.concatenate([x, *(shift_image(x, dy, dx) for dy, dx in shifts)], axis=0)
        return self.to_patch_tokens(x)


class SmallDatasetViT(AbstractClassTokenViT):
    """The Vision Transformer for small datasets: ViT with SPT and LSA.

    The image is embedded by `SPT`; a class token is prepended, learned position
    embeddings are added, and a pre-norm transformer encoder whose attention is `LSA` runs
    over the tokens, with no final LayerNorm. The class token (or, for `pool="mean"`, the
    mean of all tokens, class token included) goes through `LayerNorm → Linear`.

    Equal to `vit_pytorch.vit_for_small_dataset.ViT`; load its weights with
    `eqx_vision.from_vit_pytorch`. As in the reference, the output projection of the
    attention is kept even when `heads == 1` and `dim_head == dim`, the diagonal of the
    scores is masked with `-finfo.max` rather than `-inf`, and the class token is kept
    with `pool="mean"`. Unlike the reference, which silently adds the wrong position
    embeddings to a smaller image, an image of any other size than `image_size` is rejected.
    """

    to_patch_embedding: SPT
    cls_token: Float[Array, "1 dim"]
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair,
        patch_size: Positive,
        num_classes: NonNegative,
        dim: Positive,
        depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        pool: Literal["cls", "mean"] = "cls",
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int (patches are square); must divide
          `image_size`.
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features, `head_norm` of the pooled token).
        - `dim`: token dimension.
        - `depth`: number of transformer blocks.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of all tokens).
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside the transformer.
        - `emb_dropout`: dropout rate on the embedded tokens.
        - `key`: a `jax.random.key` for the initialisation.
        """
        image_hw = cast(tuple[int, int], image_size)  # a pair, from checked_arguments
        patch = patch_size
        grid = check_divisible(image_hw, (patch, patch))
        embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 5)
        self.to_patch_embedding = SPT(dim=dim, patch_size=patch, channels=channels, key=embed_key)
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
            attention=LSA,
            key=tf_key,
        )
        self.head_norm = LayerNorm(dim)
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool

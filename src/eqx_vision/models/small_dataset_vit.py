"""ViT for small datasets: "Vision Transformer for Small-Size Datasets".

Lee, Lee and Song, 2021, https://arxiv.org/abs/2112.13492.

Two add-ons that give a ViT the locality bias it lacks when trained from scratch on small
datasets: Shifted Patch Tokenization (`SPT`), which embeds each patch together with its
one-pixel-shifted neighbours, and Locality Self-Attention (`LSA`), attention with a learned
temperature and without each token's score with itself.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..interop import StateDict, register
from ..interop._vit_pytorch import (
    convert_attention,
    convert_layernorm,
    convert_linear,
    convert_patch_embedding,
    convert_transformer,
)
from ..layers import (
    AbstractClassTokenViT,
    Attention,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
    pair,
)
from ..layers._checks import checked_arguments
from ..layers._init import normal


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive; got {name}={value}.")


def _square_patch(patch_size: int) -> int:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool):
        raise ValueError(f"patch_size must be an int (square patches); got {patch_size!r}.")
    return pair(patch_size, "patch_size")[0]


class LSA(Attention):
    """Locality Self-Attention: pre-norm multi-head self-attention with a learned temperature.

    The scores are scaled by `exp(t)`, with the scalar `t` learned and initialised to
    `log(dim_head^-1/2)`, and each token's score with itself is set to `-finfo.max` before
    the softmax, so a token attends only to the others. This is the shared `Attention` with
    `locality=True` (and, as in the reference, an output projection in every case).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: token dimension, in and out.
        - `heads`: number of attention heads.
        - `dim_head`: dimension of each head's queries, keys and values.
        - `dropout`: dropout rate on the attention probabilities and on the output.
        - `key`: a `jax.random.key` for the initialisation.
        """
        super().__init__(
            dim,
            heads=heads,
            dim_head=dim_head,
            dropout=dropout,
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

    def __init__(self, *, dim: int, patch_size: int, channels: int = 3, key: PRNGKeyArray):
        """**Arguments:**

        - `dim`: the token dimension.
        - `patch_size`: height and width of a patch, an int.
        - `channels`: input channels.
        - `key`: a `jax.random.key` for the initialisation.
        """
        patch = _square_patch(patch_size)
        _check_positive(dim=dim, channels=channels)
        self.to_patch_tokens = PatchEmbedding(
            5 * channels, (patch, patch), dim, post_norm=False, key=key
        )
        self.patch_size = patch
        self.channels = channels

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "num_patches dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`, with height and width multiples of
          `patch_size`.

        **Returns:** the patch tokens `(num_patches, dim)`, patches in row-major order.
        """
        p = self.patch_size
        height, width = x.shape[-2:] if x.ndim >= 2 else (p, p)
        check_image(x, (self.channels, height, width), "SPT")
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
    mlp_head: Linear
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: Literal["cls", "mean"] = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int (patches are square); must divide
          `image_size`.
        - `num_classes`: number of output logits.
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
        image_hw = pair(image_size, "image_size")
        patch = _square_patch(patch_size)
        grid = check_divisible(image_hw, (patch, patch))
        _check_positive(
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            channels=channels,
            dim_head=dim_head,
        )
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
        self.mlp_head = Linear(dim, num_classes, key=head_key)
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool


def convert_spt(m: SPT, sd: StateDict, prefix: str) -> SPT:
    """vit-pytorch's `SPT`: `LayerNorm` and `Linear` at `{prefix}to_patch_tokens.{1,2}.`."""
    return eqx.tree_at(
        lambda s: s.to_patch_tokens,
        m,
        convert_patch_embedding(m.to_patch_tokens, sd, prefix + "to_patch_tokens."),
    )


@register(LSA)
def _lsa_from_vit_pytorch(model: LSA, sd: StateDict) -> LSA:
    out = convert_attention(model, sd, "")
    assert isinstance(out, LSA)
    return out


@register(SPT)
def _spt_from_vit_pytorch(model: SPT, sd: StateDict) -> SPT:
    return convert_spt(model, sd, "")


@register(SmallDatasetViT)
def _from_vit_pytorch(model: SmallDatasetViT, sd: StateDict) -> SmallDatasetViT:
    seq, dim = model.pos_embedding.shape
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
            convert_spt(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, 1, dim)),
            sd.take("pos_embedding", model.pos_embedding, torch_shape=(1, seq, dim)),
            convert_transformer(model.transformer, sd, "transformer."),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_linear(model.mlp_head, sd, "mlp_head.1."),
        ),
    )

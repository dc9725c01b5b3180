"""ViT: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".

Dosovitskiy et al., 2020, https://arxiv.org/abs/2010.11929.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..layers import (
    LayerNorm,
    Linear,
    PatchEmbedding,
    Transformer,
    check_divisible,
    check_image,
    check_key,
    replace,
    resample_pos_embed,
    tokens_to_grid,
)
from ..layers._checks import NonNegative, Positive, PositivePair, Rate, checked_arguments
from ..layers._init import normal
from ..layers._linear import gelu
from ..layers._random import split_key
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


Pool = Literal["cls", "mean"]
PatchEmbed = Literal["norm", "conv"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
"""The feed-forward activations by name: exact (erf) GELU, its tanh approximation, and
CLIP's `x * sigmoid(1.702 x)`."""


class ViT(eqx.Module):
    """The Vision Transformer.

    The image is cut into patches, each flattened in `(p1 p2 c)` order and embedded by
    `LayerNorm → Linear → LayerNorm`; a class token is prepended (for `pool="cls"`),
    learned position embeddings are added, and a pre-norm transformer encoder with a final
    LayerNorm runs over the tokens. The class token (or the mean of all tokens) goes through
    a linear head.

    Equal to `vit_pytorch.vit.ViT` with the default options; load its weights with
    `eqx_vision.from_vit_pytorch`. The options cover the variants of timm's
    `VisionTransformer` (the original, AugReg, DeiT, DeiT III, CLIP, register models, ...;
    load them with `eqx_vision.from_timm`): the strided-convolution patch embedding
    without norms (`patch_embedding="conv"`), biases in the qkv projection, the LayerNorm
    epsilon, a distillation token and register tokens, position embeddings that leave out
    these prefix tokens, mean pooling over the patch tokens with its own norm, a constant
    LayerScale, a LayerNorm before the encoder, other MLP activations and stochastic depth
    (drop-path).
    Unlike vit-pytorch, which silently adds the wrong position embeddings to a smaller
    image, an image of any other size than `image_size` is rejected.
    """

    to_patch_embedding: PatchEmbedding
    cls_token: Float[Array, "num_cls dim"]
    dist_token: Float[Array, "1 dim"] | None
    reg_tokens: Float[Array, "num_reg dim"] | None
    pos_embedding: Float[Array, "seq dim"]
    dropout: eqx.nn.Dropout
    pre_norm: LayerNorm | None
    transformer: Transformer
    fc_norm: LayerNorm | None
    mlp_head: Linear | None
    dist_head: Linear | None
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)
    pos_embed_prefix: bool = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: PositivePair,
        patch_size: PositivePair,
        num_classes: NonNegative,
        dim: Positive,
        depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        pool: Pool = "cls",
        channels: Positive = 3,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        patch_embedding: PatchEmbed = "norm",
        patch_bias: bool = True,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        class_token: bool | None = None,
        distillation_token: bool = False,
        num_registers: NonNegative = 0,
        pos_embed_prefix: bool = True,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool = False,
        layer_scale: float | None = None,
        activation: Activation = "gelu",
        drop_path: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width, an int or `(height, width)`.
        - `patch_size`: patch height and width, an int or a pair; must divide `image_size`
          (with `patch_embedding="conv"`, the rows and columns beyond the last whole patch
          are left out, as a strided convolution does).
        - `num_classes`: number of output logits; `0` for no head (the model returns the
          pooled features; `forward_features` returns the tokens).
        - `dim`: token dimension.
        - `depth`: number of transformer blocks.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `pool`: `"cls"` (class token) or `"mean"` (mean of the patch tokens).
        - `channels`: input channels.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside the transformer.
        - `emb_dropout`: dropout rate on the embedded tokens.

        The variants (the defaults are vit-pytorch's):

        - `patch_embedding`: `"norm"` (`LayerNorm → Linear → LayerNorm` on patches
          flattened `(p1 p2 c)`) or `"conv"` (the strided convolution of the original ViT: a
          `Linear` on patches flattened `(c p1 p2)`).
        - `patch_bias`: whether the `"conv"` patch embedding has a bias.
        - `qkv_bias`: whether the query/key/value projection has a bias.
        - `norm_eps`: the epsilon of every LayerNorm.
        - `class_token`: whether a class token is prepended; by default when `pool="cls"`.
        - `distillation_token`: a second prefix token with its own head (DeiT); the logits
          are the mean of both heads.
        - `num_registers`: register tokens, prefix tokens without a head.
        - `pos_embed_prefix`: whether the position embeddings cover the prefix tokens
          (otherwise they are added to the patch tokens only).
        - `pre_norm`: a LayerNorm on the tokens before the encoder (CLIP).
        - `final_norm`: whether the tokens (or, with `fc_norm`, the pooled token) are
          normalised at the end.
        - `fc_norm`: with `final_norm`, normalise the pooled token rather than the tokens.
        - `layer_scale`: a LayerScale in every block, initialised to this constant.
        - `activation`: the feed-forward activation: `"gelu"` (exact), `"gelu_tanh"`,
          `"quick_gelu"`.
        - `drop_path`: stochastic depth in training: each residual branch of the last
          block is dropped with this probability, those before with linearly less (see
          [`DropPath`][eqx_vision.layers.DropPath]).
        - `key`: a `jax.random.key` for the initialisation.
        """
        # checked_arguments passes both sizes as (height, width) pairs
        image_hw, patch_hw = cast(tuple[int, int], image_size), cast(tuple[int, int], patch_size)
        conv = patch_embedding == "conv"
        if conv:  # a strided convolution leaves out the rows and columns that do not fit
            grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
            if min(grid) == 0:
                raise ValueError(
                    f"image_size must be at least patch_size; got image_size={image_hw} and "
                    f"patch_size={patch_hw}."
                )
        else:
            grid = check_divisible(image_hw, patch_hw)
        if class_token is None:
            class_token = pool == "cls"
        if pool == "cls" and not class_token:
            raise ValueError('pool="cls" needs the class token; got class_token=False.')
        if distillation_token and not (class_token and pool == "cls"):
            raise ValueError('distillation_token=True needs pool="cls" and the class token.')
        # the keys of vit-pytorch's parameters as before the timm options (the same
        # initialisation for the same key); those of the options' own from another split
        embed_key, cls_key, pos_key, tf_key, head_key = jr.split(key, 5)
        dist_key, reg_key, dist_head_key = jr.split(jr.fold_in(key, 1), 3)
        num_cls = int(class_token)
        num_prefix = num_cls + int(distillation_token) + num_registers
        self.to_patch_embedding = PatchEmbedding(
            channels,
            patch_hw,
            dim,
            pre_norm=not conv,
            post_norm=not conv,
            channels_first=conv,
            bias=patch_bias or not conv,
            key=embed_key,
        )
        self.cls_token = normal(cls_key, (num_cls, dim))
        self.dist_token = normal(dist_key, (1, dim)) if distillation_token else None
        self.reg_tokens = normal(reg_key, (num_registers, dim)) if num_registers else None
        seq = grid[0] * grid[1] + (num_prefix if pos_embed_prefix else 0)
        self.pos_embedding = normal(pos_key, (seq, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.pre_norm = LayerNorm(dim, eps=norm_eps) if pre_norm else None
        self.transformer = Transformer(
            dim,
            depth,
            heads,
            dim_head,
            mlp_dim,
            dropout=dropout,
            final_norm=final_norm and not fc_norm,
            layer_scale=False if layer_scale is None else layer_scale,
            norm_eps=norm_eps,
            activation=ACTIVATIONS[activation],
            drop_path=drop_path,
            qkv_bias=qkv_bias,
            key=tf_key,
        )
        self.fc_norm = LayerNorm(dim, eps=norm_eps) if final_norm and fc_norm else None
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.dist_head = (
            Linear(dim, num_classes, key=dist_head_key)
            if num_classes > 0 and distillation_token
            else None
        )
        self.image_size = image_hw
        self.channels = channels
        self.pool = pool
        self.pos_embed_prefix = pos_embed_prefix

    @property
    def num_prefix_tokens(self) -> int:
        """The class, distillation and register tokens before the patch tokens."""
        extra = 0 if self.dist_token is None else 1
        extra += 0 if self.reg_tokens is None else self.reg_tokens.shape[0]
        return self.cls_token.shape[0] + extra

    def _prefix(self, dtype: Any) -> Float[Array, "num_prefix dim"]:
        parts = [self.cls_token, self.dist_token, self.reg_tokens]
        return jnp.concatenate([p.astype(dtype) for p in parts if p is not None], axis=0)

    def embed(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """The token sequence the encoder takes: the patch embeddings with the prefix tokens
        (class, distillation, registers) and the position embeddings, after the embedding
        dropout (with `key`) and the pre-encoder norm, if any."""
        (ph, pw), (h, w) = self.to_patch_embedding.patch_size, self.image_size
        patches = self.to_patch_embedding(x[:, : h - h % ph, : w - w % pw])
        pos = self.pos_embedding.astype(patches.dtype)
        prefix = self._prefix(patches.dtype)
        if self.pos_embed_prefix:
            tokens = jnp.concatenate([prefix, patches], axis=0) + pos
        else:
            tokens = jnp.concatenate([prefix, patches + pos], axis=0)
        tokens = self.dropout(tokens, key=key)
        if self.pre_norm is not None:
            tokens = self.pre_norm(tokens)
        return tokens

    @property
    def grid(self) -> tuple[int, int]:
        """The `(height, width)` of the patch grid."""
        (ph, pw), (h, w) = self.to_patch_embedding.patch_size, self.image_size
        return h // ph, w // pw

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the tokens after each block, as
        `(dim, grid_h, grid_w)` maps of stride `patch_size`."""
        dim = self.pos_embedding.shape[1]
        patch = cast(tuple[int, int], tuple(self.to_patch_embedding.patch_size))
        return tuple(
            FeatureInfo(i, f"transformer.layers[{i}]", dim, patch)
            for i in range(self.transformer.layers.depth)
        )

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the encoded tokens `(seq, dim)`, prefix tokens first, after the final
        norm (none with `fc_norm`, which normalises the pooled token in `forward_head`).
        """
        check_image(x, (self.channels, *self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, enc_key = split_key(key, 2)
        return self.transformer(self.embed(x, key=emb_key), key=enc_key)

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits (the mean of both heads' with a distillation token), or the
        pooled features `(dim,)` with `pre_logits` or without a head: the class token (with
        a distillation token, the mean of both), or the mean of the patch tokens, after
        `fc_norm`.
        """
        if self.pool == "mean":
            pooled = x[self.num_prefix_tokens :].mean(axis=0)
        else:
            pooled = x[0]
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        if pre_logits or self.mlp_head is None:
            return pooled if self.dist_token is None else (x[0] + x[1]) / 2
        logits = self.mlp_head(pooled)
        if self.dist_head is not None:
            logits = (logits + self.dist_head(x[1])) / 2
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
        """The final features and the tokens after chosen blocks.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which blocks (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of block indices (negative from the end).
        - `norm`: apply the final norm to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps of the patch tokens,
          `"tokens"` for the patch tokens `(grid_h * grid_w, dim)`.
        - `prefix_tokens`: return each output as `(patch output, prefix tokens)`, the prefix
          tokens `(num_prefix, dim)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stack, all of them.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, self.transformer.layers.depth, name)
        check_image(x, (self.channels, *self.image_size), name)
        check_key(self, key)
        emb_key, enc_key = split_key(key, 2)
        final, stacked = self.transformer.forward_intermediates(
            self.embed(x, key=emb_key), key=enc_key
        )
        assert stacked is not None
        outputs = []
        for i in chosen:
            y = stacked[i]
            if norm and self.transformer.norm is not None:
                y = self.transformer.norm(y)
            prefix, y = y[: self.num_prefix_tokens], y[self.num_prefix_tokens :]
            if output_fmt == "map":
                y = tokens_to_grid(y, self.grid[0])
            outputs.append((y, prefix) if prefix_tokens else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> "ViT":
        """This model for `(height, width)` images: the position embeddings of the patches
        resampled (see [`set_image_size`][eqx_vision.set_image_size])."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == self.image_size:
            return self
        patch = cast(tuple[int, int], tuple(self.to_patch_embedding.patch_size))
        if self.to_patch_embedding.channels_first:
            grid = (hw[0] // patch[0], hw[1] // patch[1])
            if min(grid) == 0:
                raise ValueError(f"ViT: image_size {hw} is smaller than patch_size {tuple(patch)}.")
        else:
            grid = check_divisible(hw, patch)
        prefix = self.num_prefix_tokens if self.pos_embed_prefix else 0
        pos = resample_pos_embed(self.pos_embedding, grid, self.grid, num_prefix=prefix)
        return replace(self, pos_embedding=pos, image_size=hw)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "ViT":
        """This model with a new classifier (and distillation head, if it has one) of
        `num_classes` outputs, or none for `0` (see [`reset_head`][eqx_vision.reset_head])."""
        dim = self.pos_embedding.shape[1]
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

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the logits `(num_classes,)`, or with `num_classes=0` the pooled
        features `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))

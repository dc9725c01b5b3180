"""CaiT: "Going deeper with Image Transformers".

Touvron et al., 2021, https://arxiv.org/abs/2103.17239.
"""

from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
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
    pair,
    replace,
    resample_pos_embed,
    split_key,
    tokens_to_grid,
)
from ..layers._checks import NonNegative, Positive, Rate, checked_arguments
from ..layers._init import normal
from ._backbone import FeatureInfo, OutputFmt, check_output_fmt, feature_indices


class CaiT(eqx.Module):
    """Class-Attention in Image Transformers.

    The image is cut into square patches, flattened in `(p1 p2 c)` order and embedded by
    `LayerNorm → Linear → LayerNorm`; learned position embeddings are added (there is no
    class token yet, and no position slot for it). A stack of self-attention blocks (the
    patch transformer) runs over the patch tokens; then a stack of class-attention blocks
    (the cls transformer) updates a learned class token, whose keys and values come from
    `[LayerNorm(cls); patches]`. The class token goes through `LayerNorm → Linear`.

    Every block uses talking-heads attention (learned `(heads, heads)` mixes of the scores
    before the softmax and of the probabilities after it, with the attention dropout in
    between) and LayerScale on both residual branches, and may be skipped at random in
    training (LayerDrop, `layer_dropout`).

    Equal to `vit_pytorch.cait.CaiT` with the default options; load its weights with
    `eqx_vision.from_vit_pytorch`. The options cover timm's `Cait` (load it with
    `eqx_vision.from_timm`): the strided-convolution patch embedding without norms
    (`patch_embedding="conv"`), biases in the query/key/value projections and in the two
    head mixes, the LayerNorm epsilon, a constant LayerScale, class-attention blocks
    without talking heads whose keys and values are `LayerNorm([cls; patches])` (the patch
    tokens normalised too), and their own MLP width. timm's final norm runs over all tokens,
    but only the class token reaches the head, so it is this model's `head_norm`.

    vit-pytorch behaviours reproduced by the defaults:

    - LayerScale's initial value comes from each layer's own 1-based position (0.1 up to
      18, 1e-5 up to 24, 1e-6 beyond), not from the depth of the network.
    - In the class attention, only the class token is layer-normalised; the patch tokens
      it attends to enter the keys and values as they leave the patch transformer, which
      has no final LayerNorm.
    - Image and patch sizes are single ints (square); `set_image_size` may give the model
      another, non-square, size (then a `(height, width)` pair).

    Deliberate differences:

    - LayerDrop is active only in training mode, and off under `eqx.nn.inference_mode`.
      The reference draws dropped layers on every forward pass, even in eval mode, so its
      predictions are random; with `layer_dropout=0` the two agree exactly.
    - Under `jax.vmap` each example draws its own dropped layers (from its own key); the
      reference draws one set per batch.
    - An image of any other size than `image_size` is rejected, where the reference
      silently adds the wrong position embeddings to a smaller one.

    As a backbone (as timm's `Cait`): `forward_features` returns `[class token; patch
    tokens]` after `head_norm` (timm's final norm over all the tokens), and the
    intermediate outputs are the patch tokens after each self-attention block; the
    class-attention blocks update the class token only, so have no feature maps.
    """

    to_patch_embedding: PatchEmbedding
    pos_embedding: Float[Array, "seq dim"]
    cls_token: Float[Array, "1 dim"]
    dropout: eqx.nn.Dropout
    patch_transformer: Transformer
    cls_transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear | None
    image_size: int | tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Positive,
        num_classes: NonNegative,
        dim: Positive,
        depth: Positive,
        cls_depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        layer_dropout: Rate = 0.0,
        channels: Positive = 3,
        patch_embedding: Literal["norm", "conv"] = "norm",
        qkv_bias: bool = False,
        talking_heads_bias: bool = False,
        norm_eps: float = 1e-5,
        layer_scale: float | None = None,
        cls_talking_heads: bool = True,
        cls_norm_patches: bool = False,
        cls_mlp_dim: Positive | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width (square images).
        - `patch_size`: patch height and width; must divide `image_size`.
        - `num_classes`: number of output logits; with 0 there is no head, and the model
          returns the normalised class token, `(dim,)`.
        - `dim`: token dimension.
        - `depth`: number of self-attention blocks over the patch tokens.
        - `cls_depth`: number of class-attention blocks updating the class token.
        - `heads`: attention heads per block.
        - `mlp_dim`: hidden width of the feed-forward blocks.
        - `dim_head`: dimension per attention head.
        - `dropout`: dropout rate inside the blocks.
        - `emb_dropout`: dropout rate on the embedded patch tokens.
        - `layer_dropout`: probability of skipping each block in training (LayerDrop), drawn
          separately for the two stacks; if every block of a stack is drawn, one of them
          is kept.
        - `channels`: input channels.

        The variants (the defaults are vit-pytorch's; timm's `Cait` sets each of them):

        - `patch_embedding`: `"norm"` (`LayerNorm → Linear → LayerNorm` on patches
          flattened `(p1 p2 c)`) or `"conv"` (a strided convolution: a `Linear` on patches
          flattened `(c p1 p2)`).
        - `qkv_bias`: whether the query/key/value projections have a bias.
        - `talking_heads_bias`: whether the two head mixes of the talking heads add a
          learned bias per head.
        - `norm_eps`: the epsilon of the LayerNorms of the blocks and the head (the
          `"norm"` patch embedding keeps 1e-5).
        - `layer_scale`: LayerScale's initial value in every block; by default it depends
          on the layer's index, as above.
        - `cls_talking_heads`: whether the class-attention blocks use talking heads too.
        - `cls_norm_patches`: whether the class attention layer-normalises the patch tokens
          (with the class token's norm) before taking keys and values from them.
        - `cls_mlp_dim`: hidden width of the class-attention blocks' feed-forward
          (default `mlp_dim`).
        - `key`: a `jax.random.key` for the initialisation.
        """
        size, patch = image_size, patch_size
        grid = check_divisible((size, size), (patch, patch))
        embed_key, pos_key, cls_key, patch_key, cls_tf_key, head_key = jr.split(key, 6)

        def encoder(
            stack_depth: int, hidden: int, talking: bool, norm_context: bool, k: PRNGKeyArray
        ) -> Transformer:
            return Transformer(
                dim,
                stack_depth,
                heads,
                dim_head,
                hidden,
                dropout=dropout,
                final_norm=False,
                layer_dropout=layer_dropout,
                layer_scale=True if layer_scale is None else layer_scale,
                norm_eps=norm_eps,
                talking_heads=talking,
                talking_heads_bias=talking and talking_heads_bias,
                fused_qkv=False,
                qkv_bias=qkv_bias,
                project_out=True,
                norm_context=norm_context,
                key=k,
            )

        conv = patch_embedding == "conv"
        self.to_patch_embedding = PatchEmbedding(
            channels,
            (patch, patch),
            dim,
            pre_norm=not conv,
            post_norm=not conv,
            channels_first=conv,
            key=embed_key,
        )
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1], dim))
        self.cls_token = normal(cls_key, (1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.patch_transformer = encoder(depth, mlp_dim, True, False, patch_key)
        cls_hidden = mlp_dim if cls_mlp_dim is None else cls_mlp_dim
        self.cls_transformer = encoder(
            cls_depth, cls_hidden, cls_talking_heads, cls_norm_patches, cls_tf_key
        )
        self.head_norm = LayerNorm(dim, eps=norm_eps)
        self.mlp_head = Linear(dim, num_classes, key=head_key) if num_classes > 0 else None
        self.image_size = size
        self.channels = channels

    @property
    def patch_size(self) -> tuple[int, int]:
        """The `(height, width)` of a patch."""
        return cast(tuple[int, int], tuple(self.to_patch_embedding.patch_size))

    @property
    def grid(self) -> tuple[int, int]:
        """The `(height, width)` of the patch grid."""
        (h, w), (ph, pw) = pair(self.image_size, "image_size"), self.patch_size
        return h // ph, w // pw

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The outputs of `forward_intermediates`: the patch tokens after each block of the
        patch transformer, as `(dim, grid_h, grid_w)` maps of stride `patch_size`."""
        dim = self.pos_embedding.shape[1]
        return tuple(
            FeatureInfo(i, f"patch_transformer.layers[{i}]", dim, self.patch_size)
            for i in range(self.patch_transformer.layers.depth)
        )

    def embed(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """The patch tokens the patch transformer takes: the patch embeddings plus the
        position embeddings, after the embedding dropout (with `key`)."""
        check_image(x, (self.channels, *pair(self.image_size, "image_size")), type(self).__name__)
        tokens = self.to_patch_embedding(x)
        tokens = tokens + self.pos_embedding.astype(tokens.dtype)
        return self.dropout(tokens, key=key)

    def _class_attend(
        self, patches: Float[Array, "seq dim"], key: PRNGKeyArray | None
    ) -> Float[Array, "tokens dim"]:
        """`head_norm([class token; patches])`, the class token updated by the
        class-attention blocks."""
        cls = self.cls_transformer(self.cls_token.astype(patches.dtype), patches, key=key)
        return self.head_norm(jnp.concatenate([cls, patches], axis=0))

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "tokens dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only in training mode with a non-zero
          `dropout`, `emb_dropout` or `layer_dropout`.

        **Returns:** `[class token; patch tokens]`, `(1 + grid_h * grid_w, dim)`, after
        `head_norm` (as timm's `forward_features`).
        """
        check_key(self, key)
        emb_key, patch_key, cls_key = split_key(key, 3)
        patches = self.patch_transformer(self.embed(x, key=emb_key), key=patch_key)
        return self._class_attend(patches, cls_key)

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the normalised
        class token `(dim,)`.
        """
        if pre_logits or self.mlp_head is None:
            return x[0]
        return self.mlp_head(x[0])

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFmt = "map",
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the patch tokens after chosen blocks of the patch
        transformer (timm's `forward_intermediates` of `Cait`).

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which blocks (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of block indices (negative from the end).
        - `norm`: apply `head_norm` (timm's final norm) to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps, `"tokens"` for the
          tokens `(grid_h * grid_w, dim)` (the class token is not among them yet).
        - `intermediates_only`: return the list of outputs only (the class-attention
          blocks are then not run).
        - `key`: as in `forward_features`.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stacks.
        """
        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, self.patch_transformer.layers.depth, name)
        check_key(self, key)
        emb_key, patch_key, cls_key = split_key(key, 3)
        patches, stacked = self.patch_transformer.forward_intermediates(
            self.embed(x, key=emb_key), key=patch_key
        )
        assert stacked is not None
        outputs = []
        for i in chosen:
            y = self.head_norm(stacked[i]) if norm else stacked[i]
            outputs.append(tokens_to_grid(y, self.grid[0]) if output_fmt == "map" else y)
        if intermediates_only:
            return outputs
        return self._class_attend(patches, cls_key), outputs

    def set_image_size(self, image_size: tuple[int, int]) -> "CaiT":
        """This model for `(height, width)` images: the position embeddings resampled (see
        [`set_image_size`][eqx_vision.set_image_size]); the patch size must divide the new
        size (with `patch_embedding="conv"` too)."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == pair(self.image_size, "image_size"):
            return self
        grid = check_divisible(hw, self.patch_size)
        pos = resample_pos_embed(self.pos_embedding, grid, self.grid)
        return replace(self, pos_embedding=pos, image_size=hw[0] if hw[0] == hw[1] else hw)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> "CaiT":
        """This model with a new linear classifier of `num_classes` outputs, or none for
        `0` (see [`reset_head`][eqx_vision.reset_head])."""
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(self.pos_embedding.shape[1], num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only in training mode with a non-zero
          `dropout`, `emb_dropout` or `layer_dropout`.

        **Returns:** the logits, `(num_classes,)`; without a head (`num_classes=0`), the
        normalised class token, `(dim,)`: `forward_head(forward_features(x, key=key))`.
        """
        return self.forward_head(self.forward_features(x, key=key))

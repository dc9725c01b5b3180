"""CaiT: "Going deeper with Image Transformers".

Touvron et al., 2021, https://arxiv.org/abs/2103.17239.
"""

from typing import Literal

import equinox as eqx
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
    split_key,
)
from ..layers._checks import NonNegative, Positive, Rate, checked_arguments
from ..layers._init import normal


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
    - Image and patch sizes are single ints (square).

    Deliberate differences:

    - LayerDrop is active only in training mode, and off under `eqx.nn.inference_mode`.
      The reference draws dropped layers on every forward pass, even in eval mode, so its
      predictions are random; with `layer_dropout=0` the two agree exactly.
    - Under `jax.vmap` each example draws its own dropped layers (from its own key); the
      reference draws one set per batch.
    - An image of any other size than `image_size` is rejected, where the reference
      silently adds the wrong position embeddings to a smaller one.
    """

    to_patch_embedding: PatchEmbedding
    pos_embedding: Float[Array, "seq dim"]
    cls_token: Float[Array, "1 dim"]
    dropout: eqx.nn.Dropout
    patch_transformer: Transformer
    cls_transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear | None
    image_size: int = eqx.field(static=True)
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

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(channels, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only in training mode with a non-zero
          `dropout`, `emb_dropout` or `layer_dropout`.

        **Returns:** the logits, `(num_classes,)`; without a head (`num_classes=0`), the
        normalised class token, `(dim,)`.
        """
        check_image(x, (self.channels, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, patch_key, cls_key = split_key(key, 3)
        tokens = self.to_patch_embedding(x)
        tokens = tokens + self.pos_embedding.astype(tokens.dtype)
        tokens = self.dropout(tokens, key=emb_key)
        tokens = self.patch_transformer(tokens, key=patch_key)
        cls = self.cls_transformer(self.cls_token.astype(tokens.dtype), tokens, key=cls_key)
        pooled = self.head_norm(cls[0])
        return pooled if self.mlp_head is None else self.mlp_head(pooled)

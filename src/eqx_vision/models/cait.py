"""CaiT: "Going deeper with Image Transformers".

Touvron et al., 2021, https://arxiv.org/abs/2103.17239.
"""

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
from ..layers._checks import Positive, Rate, checked_arguments
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

    Equal to `vit_pytorch.cait.CaiT`; load its weights with `eqx_vision.from_vit_pytorch`.
    Reference behaviours reproduced:

    - LayerScale's initial value comes from each layer's own 1-based position (0.1 up to
      18, 1e-5 up to 24, 1e-6 beyond), not from the depth of the network.
    - In the class attention, only the class token is layer-normalised; the patch tokens
      it attends to enter the keys and values as they leave the patch transformer, which
      has no final LayerNorm.
    - The input has 3 channels, and image and patch sizes are single ints (square).

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
    mlp_head: Linear
    image_size: int = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        *,
        image_size: Positive,
        patch_size: Positive,
        num_classes: Positive,
        dim: Positive,
        depth: Positive,
        cls_depth: Positive,
        heads: Positive,
        mlp_dim: Positive,
        dim_head: Positive = 64,
        dropout: Rate = 0.0,
        emb_dropout: Rate = 0.0,
        layer_dropout: Rate = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: image height and width (square images).
        - `patch_size`: patch height and width; must divide `image_size`.
        - `num_classes`: number of output logits.
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
        - `key`: a `jax.random.key` for the initialisation.
        """
        size, patch = image_size, patch_size
        grid = check_divisible((size, size), (patch, patch))
        embed_key, pos_key, cls_key, patch_key, cls_tf_key, head_key = jr.split(key, 6)

        def encoder(stack_depth: int, stack_key: PRNGKeyArray) -> Transformer:
            return Transformer(
                dim,
                stack_depth,
                heads,
                dim_head,
                mlp_dim,
                dropout=dropout,
                final_norm=False,
                layer_dropout=layer_dropout,
                layer_scale=True,
                talking_heads=True,
                fused_qkv=False,
                project_out=True,
                key=stack_key,
            )

        self.to_patch_embedding = PatchEmbedding(3, (patch, patch), dim, key=embed_key)
        self.pos_embedding = normal(pos_key, (grid[0] * grid[1], dim))
        self.cls_token = normal(cls_key, (1, dim))
        self.dropout = eqx.nn.Dropout(emb_dropout)
        self.patch_transformer = encoder(depth, patch_key)
        self.cls_transformer = encoder(cls_depth, cls_tf_key)
        self.head_norm = LayerNorm(dim)
        self.mlp_head = Linear(dim, num_classes, key=head_key)
        self.image_size = size

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, `(3, image_size, image_size)`.
        - `key`: a `jax.random.key`, needed only in training mode with a non-zero
          `dropout`, `emb_dropout` or `layer_dropout`.

        **Returns:** the logits, `(num_classes,)`.
        """
        check_image(x, (3, self.image_size, self.image_size), type(self).__name__)
        check_key(self, key)
        emb_key, patch_key, cls_key = split_key(key, 3)
        tokens = self.to_patch_embedding(x)
        tokens = tokens + self.pos_embedding.astype(tokens.dtype)
        tokens = self.dropout(tokens, key=emb_key)
        tokens = self.patch_transformer(tokens, key=patch_key)
        cls = self.cls_transformer(self.cls_token.astype(tokens.dtype), tokens, key=cls_key)
        return self.mlp_head(self.head_norm(cls[0]))

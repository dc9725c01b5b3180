"""The class token, position embeddings and pooling around the encoders of the ViT family."""

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_choice
from ._grid import tokens_to_grid
from ._linear import Linear
from ._patch import check_divisible, check_image, pair
from ._random import check_key, split_key
from ._replace import replace
from ._resize import resample_pos_embed


def with_class_tokens(
    tokens: Float[Array, "seq dim"],
    cls_token: Float[Array, "num_cls dim"],
    pos_embedding: Float[Array, "num_cls+seq dim"],
) -> Float[Array, "num_cls+seq dim"]:
    """`[cls_token; tokens] + pos_embedding`, the parameters cast to the dtype of `tokens`
    (bfloat16 tokens stay bfloat16). `cls_token` may have no rows."""
    tokens = jnp.concatenate([cls_token.astype(tokens.dtype), tokens], axis=0)
    return tokens + pos_embedding.astype(tokens.dtype)


def encode_with_class_tokens(
    tokens: Float[Array, "seq dim"],
    cls_token: Float[Array, "num_cls dim"],
    pos_embedding: Float[Array, "num_cls+seq dim"],
    dropout: eqx.nn.Dropout,
    encoder: "_Encoder",
    *,
    key: PRNGKeyArray | None,
) -> Float[Array, "num_cls+seq dim"]:
    """`encoder(dropout(with_class_tokens(tokens, cls_token, pos_embedding)))`: the stage
    between the patch embedding and the head of the ViT family, `key` split in two for the
    dropout and the encoder."""
    emb_key, enc_key = split_key(key, 2)
    tokens = dropout(with_class_tokens(tokens, cls_token, pos_embedding), key=emb_key)
    return encoder(tokens, key=enc_key)


def pool_tokens(tokens: Float[Array, "seq dim"], pool: str) -> Float[Array, " dim"]:
    """The mean of all the tokens for `pool="mean"` (a class token included), else the
    first token, the class token."""
    check_choice(pool, "pool", ("cls", "mean"))
    return tokens.mean(axis=0) if pool == "mean" else tokens[0]


class _TokenMap(Protocol):
    def __call__(self, x: Array, /) -> Array: ...


class _Encoder(Protocol):
    def __call__(self, x: Array, /, *, key: Any = None) -> Array: ...


class AbstractClassTokenViT(eqx.Module):
    """The forward pass of a ViT classifier with a `LayerNorm → Linear` head on one pooled
    token, for subclasses that declare the fields below and build them.

    The model embeds the image's patches (`to_patch_embedding`), prepends the class token
    and adds the position embeddings ([`with_class_tokens`][eqx_vision.layers.with_class_tokens]),
    applies `dropout` and runs the encoder (`transformer`): that is `forward_features`.
    `forward_head` pools the tokens ([`pool_tokens`][eqx_vision.layers.pool_tokens] with
    `pool`) and returns `mlp_head(head_norm(pooled))` (`head_norm(pooled)` without a head).
    An image of any other shape than `(channels, *image_size)` is rejected. DeepViT,
    Parallel ViT and the ViT for small datasets are this form with their own patch
    embedding and encoder; a new variant of the same form only declares and builds its
    fields. The patch embedding must have a `patch_size` (an int or a pair).

    The backbone API (`forward_features`, `forward_head`, `forward_intermediates`,
    `feature_info`, `set_image_size`, `reset_head`) is shared here: the intermediate
    outputs are the tokens after each block of the encoder; the encoder has no final norm,
    and `norm=True` applies `head_norm`, the norm of the pooled token, to them.
    """

    to_patch_embedding: eqx.AbstractVar[_TokenMap]
    cls_token: eqx.AbstractVar[Array]
    pos_embedding: eqx.AbstractVar[Array]
    dropout: eqx.AbstractVar[eqx.nn.Dropout]
    transformer: eqx.AbstractVar[_Encoder]
    head_norm: eqx.AbstractVar[_TokenMap]
    mlp_head: eqx.AbstractVar[_TokenMap | None]
    image_size: eqx.AbstractVar[int | tuple[int, int]]
    channels: eqx.AbstractVar[int]
    pool: eqx.AbstractVar[str]

    @property
    def patch_size(self) -> tuple[int, int]:
        """The `(height, width)` of a patch."""
        return pair(self.to_patch_embedding.patch_size, "patch_size")  # pyright: ignore[reportAttributeAccessIssue]

    @property
    def grid(self) -> tuple[int, int]:
        """The `(height, width)` of the patch grid."""
        (h, w), (ph, pw) = pair(self.image_size, "image_size"), self.patch_size
        return h // ph, w // pw

    @property
    def feature_info(self) -> tuple[Any, ...]:
        """The outputs of `forward_intermediates`: the tokens after each block, as
        `(dim, grid_h, grid_w)` maps of stride `patch_size` (`FeatureInfo`s)."""
        from ..models._backbone import FeatureInfo  # models import layers, not the reverse

        dim = self.pos_embedding.shape[1]
        depth = _depth(self.transformer)
        return tuple(
            FeatureInfo(i, f"transformer.layers[{i}]", dim, self.patch_size) for i in range(depth)
        )

    def embed(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """The token sequence the encoder takes: `[class token; patch embeddings]` plus the
        position embeddings, after the embedding dropout (with `key`)."""
        check_image(x, (self.channels, *pair(self.image_size, "image_size")), type(self).__name__)
        tokens = with_class_tokens(self.to_patch_embedding(x), self.cls_token, self.pos_embedding)
        return self.dropout(tokens, key=key)

    def forward_features(
        self, x: Float[Array, "channels height width"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        """**Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** the encoded tokens `(1 + grid_h * grid_w, dim)`, the class token first
        (no norm: the head normalises the pooled token).
        """
        check_key(self, key)
        emb_key, enc_key = split_key(key, 2)
        return self.transformer(self.embed(x, key=emb_key), key=enc_key)

    def forward_head(
        self, x: Float[Array, "seq dim"], *, pre_logits: bool = False
    ) -> Float[Array, " num_classes"] | Float[Array, " dim"]:
        """**Arguments:**

        - `x`: the tokens from `forward_features`.
        - `pre_logits`: return the pooled features instead of the logits.

        **Returns:** the logits, or with `pre_logits` or without a head the pooled features
        `(dim,)`: `head_norm` of the class token (`pool="cls"`) or of the mean of all the
        tokens (`pool="mean"`).
        """
        pooled = self.head_norm(pool_tokens(x, self.pool))
        if pre_logits or self.mlp_head is None:
            return pooled
        return self.mlp_head(pooled)

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: Literal["map", "tokens"] = "map",
        prefix_tokens: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """The final features and the tokens after chosen blocks.

        **Arguments:**

        - `x`: one image, `(channels, height, width)`.
        - `indices`: which blocks (see `feature_info`): `None` for all, an int `n` for the
          last `n`, or a sequence of block indices (negative from the end).
        - `norm`: apply `head_norm` (the model's only final norm) to each output.
        - `output_fmt`: `"map"` for `(dim, grid_h, grid_w)` maps of the patch tokens,
          `"tokens"` for the patch tokens `(grid_h * grid_w, dim)`.
        - `prefix_tokens`: return each output as `(patch output, class token)`, the class
          token `(1, dim)`.
        - `intermediates_only`: return the list of outputs only.
        - `key`: a `jax.random.key`, needed only for dropout in training mode.

        **Returns:** `(forward_features(x), outputs)`, or `outputs` with
        `intermediates_only`; `outputs` is a list in the order of `indices`. The blocks run
        in their scanned stack, all of them.
        """
        from ..models._backbone import check_output_fmt, feature_indices

        name = type(self).__name__
        check_output_fmt(output_fmt, name)
        chosen = feature_indices(indices, _depth(self.transformer), name)
        check_key(self, key)
        emb_key, enc_key = split_key(key, 2)
        tokens = self.embed(x, key=emb_key)
        final, stacked = self.transformer.forward_intermediates(tokens, key=enc_key)  # pyright: ignore[reportAttributeAccessIssue]
        outputs = []
        for i in chosen:
            y = stacked[i]
            if norm:
                y = self.head_norm(y)
            prefix, y = y[:1], y[1:]
            if output_fmt == "map":
                y = tokens_to_grid(y, self.grid[0])
            outputs.append((y, prefix) if prefix_tokens else y)
        return outputs if intermediates_only else (final, outputs)

    def set_image_size(self, image_size: tuple[int, int]) -> Any:
        """This model for `(height, width)` images: the position embeddings of the patches
        resampled, the class token's kept (see [`set_image_size`][eqx_vision.set_image_size]).
        The patch size must divide the new size."""
        hw = (int(image_size[0]), int(image_size[1]))
        if hw == pair(self.image_size, "image_size"):
            return self
        grid = check_divisible(hw, self.patch_size)
        pos = resample_pos_embed(self.pos_embedding, grid, self.grid, num_prefix=1)
        new_size: int | tuple[int, int] = hw
        if isinstance(self.image_size, int) and hw[0] == hw[1]:
            new_size = hw[0]  # a model of square images keeps an int
        return replace(self, pos_embedding=pos, image_size=new_size)

    def reset_head(self, num_classes: int, *, key: PRNGKeyArray | None = None) -> Any:
        """This model with a new `head_norm → Linear` classifier of `num_classes` outputs
        (the norm kept), or none for `0` (see [`reset_head`][eqx_vision.reset_head])."""
        dim = self.pos_embedding.shape[1]
        head = None
        if num_classes > 0:
            assert key is not None
            head = Linear(dim, num_classes, key=key)
        return eqx.tree_at(lambda m: m.mlp_head, self, head, is_leaf=lambda n: n is None)

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


def _depth(encoder: Any) -> int:
    return encoder.layers.depth

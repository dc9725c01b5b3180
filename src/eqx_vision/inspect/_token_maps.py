"""Looking inside a model: the attention probabilities of its transformer layers.

The models return logits only; these functions re-run a model's encoder with the same
parameters and also return what each attention layer attends to. They reuse the model's
own modules (patch embedding, attention projections, blocks), so the maps are those of the
forward pass that produced the logits, in inference mode (no dropout).

```python
import jax, eqx_vision as ev
from eqx_vision.inspect import attention_maps, attention_rollout

model = ev.ViT(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=6,
               heads=6, mlp_dim=1536, key=jax.random.key(0))
maps = attention_maps(model, image)        # (depth, heads, 197, 197)
cls_to_patches = maps[:, :, 0, 1:]         # what the class token reads, per layer and head
rollout = attention_rollout(maps)          # (197, 197), attention flow through all layers
```
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..layers import (
    Attention,
    Transformer,
    TransformerBlock,
    check_image,
    sincos_2d,
)
from ..models import DeepViT, SimpleViT, SmallDatasetViT, ViT


SupportedModel = ViT | SimpleViT | DeepViT | SmallDatasetViT


def attention_probabilities(
    attn: Attention,
    x: Float[Array, "seq dim"],
    context: Float[Array, "ctx_seq dim"] | None = None,
    *,
    bias: Float[Array, "heads seq kv_seq"] | None = None,
) -> Float[Array, "heads seq kv_seq"]:
    """The attention probabilities of one `eqx_vision.layers.Attention` on `x`.

    These are the weights that multiply the values in `attn(x, context, bias=bias)`:
    the softmax of the scaled scores, after the head mixes of the variants (talking heads,
    re-attention) and with the diagonal masked for locality attention. Dropout is not
    applied. Each row sums to one, except after the head mixes of talking heads and
    re-attention, which do not keep the sums.

    **Arguments:**

    - `attn`: the attention layer.
    - `x`: its input tokens `(seq, dim)` (before its pre-norm, as the layer receives them).
    - `context`: the extra keys/values given to the layer, if any.
    - `bias`: the score bias given to the layer, if any.

    **Returns:** `(heads, seq, kv_seq)`, where `kv_seq` is `seq`, or `seq + ctx_seq` with a
    context (keys ordered `[x; context]`).
    """
    return attn.probabilities(x, context, bias=bias)


def transformer_attention_maps(
    transformer: Transformer,
    x: Float[Array, "seq dim"],
    context: Float[Array, "ctx_seq dim"] | None = None,
) -> tuple[Float[Array, "seq dim"], Float[Array, "depth heads seq kv_seq"]]:
    """Run a `eqx_vision.layers.Transformer` in inference mode and collect the attention
    probabilities of every block.

    **Arguments:**

    - `transformer`: the encoder. Its blocks must have one attention each (not
      `Parallel` branches).
    - `x`: the input tokens `(seq, dim)`.
    - `context`: extra keys/values given to every block, if any.

    **Returns:** the encoder's output tokens `(seq, dim)` (exactly what
    `transformer(x, context)` returns in inference mode) and the probabilities
    `(depth, heads, seq, kv_seq)`, block by block.
    """
    transformer = eqx.nn.inference_mode(transformer)
    dynamic, static = eqx.partition(transformer.layers.blocks, eqx.is_array)
    if not isinstance(static.attn, Attention):
        raise TypeError(
            "transformer_attention_maps needs blocks with a single Attention; got "
            f"{type(static.attn).__name__}."
        )

    def step(tokens, params):
        block: TransformerBlock = eqx.combine(params, static)
        assert isinstance(block.attn, Attention)
        probs = attention_probabilities(block.attn, tokens, context)
        return block(tokens, context), probs

    x, maps = jax.lax.scan(step, x, dynamic)
    if transformer.norm is not None:
        x = transformer.norm(x)
    return x, maps


def _tokens(model: SupportedModel, image: Float[Array, "channels height width"]) -> Array:
    """The token sequence a model feeds its encoder (inference mode: no dropout)."""
    size = model.image_size
    hw = (size, size) if isinstance(size, int) else size
    check_image(image, (model.channels, *hw), type(model).__name__)
    if isinstance(model, ViT):  # prefix tokens and the options of timm's variants
        return eqx.nn.inference_mode(model).embed(image)
    tokens = model.to_patch_embedding(image)
    if isinstance(model, SimpleViT):
        return tokens + jnp.asarray(sincos_2d(*model.grid, model.dim), dtype=tokens.dtype)
    tokens = jnp.concatenate([model.cls_token.astype(tokens.dtype), tokens], axis=0)
    return tokens + model.pos_embedding.astype(tokens.dtype)


def attention_maps(
    model: SupportedModel, image: Float[Array, "channels height width"]
) -> Float[Array, "depth heads seq seq"]:
    """The attention probabilities of every layer of a ViT-style model on one image.

    Supported: `ViT`, `SimpleViT`, `DeepViT` and `SmallDatasetViT`, the models whose
    encoder is one `Transformer` over `[class token;] patch tokens`. The model is used in
    inference mode (no dropout), so no key is needed.

    **Arguments:**

    - `model`: the model.
    - `image`: one image `(channels, height, width)`, as the model takes it.

    **Returns:** `(depth, heads, seq, seq)`: for each layer and head, row `i` is how token
    `i` distributes its attention over the tokens. The tokens are the class token first
    (`ViT` with `pool="cls"`, `DeepViT`, `SmallDatasetViT`; none for `SimpleViT` and a
    mean-pooled `ViT`), then the patches in row-major order, so
    `maps[layer, head, 0, 1:].reshape(grid_h, grid_w)` is the class token's map over the
    image.
    """
    if not isinstance(model, ViT | SimpleViT | DeepViT | SmallDatasetViT):
        raise TypeError(
            "attention_maps supports ViT, SimpleViT, DeepViT and SmallDatasetViT; got "
            f"{type(model).__name__}. For another model, call transformer_attention_maps or "
            "attention_probabilities on its layers."
        )
    model = eqx.nn.inference_mode(model)
    _, maps = transformer_attention_maps(model.transformer, _tokens(model, image))
    return maps


def attention_rollout(
    maps: Float[Array, "depth heads seq seq"], *, residual: bool = True
) -> Float[Array, "seq seq"]:
    """Attention rollout (Abnar and Zuidema, 2020, https://arxiv.org/abs/2005.00928).

    The heads of each layer are averaged; with `residual`, the identity is added and the
    rows renormalised (`0.5 * A + 0.5 * I`) to account for the skip connections; the
    layers' matrices are then multiplied from the first to the last.

    **Arguments:**

    - `maps`: attention probabilities `(depth, heads, seq, seq)`, e.g. from
      [`attention_maps`][eqx_vision.inspect.attention_maps].
    - `residual`: whether to account for the residual connections.

    **Returns:** `(seq, seq)`: row `i` estimates how much each input token flows into
    output token `i`.
    """
    mean = maps.mean(axis=1)
    if residual:
        eye = jnp.eye(mean.shape[-1], dtype=mean.dtype)
        mean = 0.5 * mean + 0.5 * eye
        mean = mean / mean.sum(axis=-1, keepdims=True)

    def step(acc, layer):
        return layer @ acc, None

    rollout, _ = jax.lax.scan(step, jnp.eye(mean.shape[-1], dtype=mean.dtype), mean)
    return rollout

"""`eqx_vision.inspect`: attention maps are the ones the forward pass uses."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqx_vision as ev
from eqx_vision.inspect import (
    attention_maps,
    attention_probabilities,
    attention_rollout,
    transformer_attention_maps,
)
from eqx_vision.layers import Attention, Transformer, merge_heads, split_heads
from tiny import build


def _output_from_probs(attn: Attention, x, probs, context=None):
    """`attn(x, context)` recomputed from the probabilities (inference mode)."""
    h = attn.norm(x) if attn.norm is not None else x
    if attn.to_qkv is not None:
        _, _, v = jnp.split(attn.to_qkv(h), 3, axis=-1)
    else:
        assert attn.to_kv is not None
        kv_input = h if context is None else jnp.concatenate([h, context], axis=0)
        _, v = jnp.split(attn.to_kv(kv_input), 2, axis=-1)
    out = merge_heads(jnp.einsum("hij,hjd->hid", probs, split_heads(v, attn.heads)))
    return out if attn.to_out is None else attn.to_out(out)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"talking_heads": True},
        {"reattention": True},
        {"locality": True},
        {"fused_qkv": False},
        {"heads": 1, "dim_head": 16},
    ],
    ids=["plain", "talking_heads", "reattention", "locality", "context", "no_out"],
)
def test_probabilities_reproduce_the_attention_output(options):
    options = {"heads": 4, "dim_head": 8} | options
    attn = eqx.nn.inference_mode(Attention(16, dropout=0.1, key=jr.key(0), **options))
    x = jr.normal(jr.key(1), (5, 16))
    context = jr.normal(jr.key(2), (3, 16)) if not options.get("fused_qkv", True) else None
    probs = attention_probabilities(attn, x, context)
    kv = 5 if context is None else 8
    assert probs.shape == (options["heads"], 5, kv)
    np.testing.assert_allclose(
        _output_from_probs(attn, x, probs, context), attn(x, context), rtol=1e-5, atol=1e-5
    )
    if not (options.get("reattention") or options.get("talking_heads")):  # head mixes
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    if options.get("locality"):
        np.testing.assert_array_equal(jnp.diagonal(probs, axis1=1, axis2=2), 0.0)


def test_probabilities_with_bias():
    attn = Attention(16, heads=2, dim_head=8, key=jr.key(0))
    x = jr.normal(jr.key(1), (4, 16))
    bias = jnp.full((2, 4, 4), -1e9).at[:, :, 0].set(0.0)
    probs = attention_probabilities(attn, x, bias=bias)
    np.testing.assert_allclose(probs[:, :, 0], 1.0)
    np.testing.assert_allclose(_output_from_probs(attn, x, probs), attn(x, bias=bias), atol=1e-5)


def test_transformer_maps_and_output():
    tf = Transformer(16, 3, 2, 8, 32, dropout=0.2, key=jr.key(0))
    x = jr.normal(jr.key(1), (6, 16))
    out, maps = transformer_attention_maps(tf, x)
    assert maps.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(out, eqx.nn.inference_mode(tf)(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps[0], attention_probabilities(tf.layers[0].attn, x), atol=1e-6)  # pyright: ignore[reportArgumentType]


# Tiny presets, with what each case varies: a rectangular one-channel image and dropout,
# mean pooling, several blocks, more heads.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ViT": ("ViT", dict(image_size=(16, 24), patch_size=8, depth=2, channels=1, dropout=0.1,
                        emb_dropout=0.1)),
    "ViT-mean": ("ViT", dict(pool="mean")),
    "SimpleViT": ("SimpleViT", dict(depth=2)),
    "DeepViT": ("DeepViT", dict(patch_size=8, depth=3)),
    "SmallDatasetViT": ("SmallDatasetViT", dict(patch_size=8, depth=2, heads=4)),
}  # fmt: skip


def build_model(case: str, key: jax.Array) -> Any:
    name, overrides = MODELS[case]
    return build(name, key, **overrides)[0]


def _head(model, tokens):
    """The logits from the encoder output, as each model's `__call__` computes them."""
    if isinstance(model, ev.SimpleViT):
        assert model.linear_head is not None
        return model.linear_head(tokens.mean(axis=0))
    pooled = tokens.mean(axis=0) if model.pool == "mean" else tokens[0]
    head_norm = getattr(model, "head_norm", None)
    head = model.mlp_head
    return head(pooled if head_norm is None else head_norm(pooled))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_attention_maps_of_models(name):
    from eqx_vision.inspect._token_maps import _tokens

    model = build_model(name, jr.key(0))
    image = jr.normal(jr.key(1), (model.channels, *np.broadcast_to(model.image_size, 2)))
    maps = attention_maps(model, image)
    tokens = _tokens(model, image)
    depth, heads = len(model.transformer.layers), model.transformer.layers[0].attn.heads  # pyright: ignore[reportAttributeAccessIssue]
    assert maps.shape == (depth, heads, tokens.shape[0], tokens.shape[0])
    out, maps2 = transformer_attention_maps(model.transformer, tokens)
    np.testing.assert_array_equal(maps, maps2)
    infer = eqx.nn.inference_mode(model)
    np.testing.assert_allclose(_head(infer, out), infer(image), rtol=1e-5, atol=1e-5)
    if name != "DeepViT":  # re-attention's LayerNorm over the heads does not keep row sums
        np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    jitted = eqx.filter_jit(attention_maps)(model, image)
    np.testing.assert_allclose(jitted, maps, rtol=1e-5, atol=1e-6)


def test_attention_maps_of_a_vit_with_timm_options():
    """Registers, position embeddings without the prefix and a norm before the encoder:
    the maps cover the class and register tokens, and the encoder's output is the model's."""
    from eqx_vision.inspect._token_maps import _tokens

    model = ev.ViT(
        image_size=8,
        patch_size=4,
        num_classes=0,
        dim=8,
        depth=2,
        heads=2,
        mlp_dim=16,
        patch_embedding="conv",
        num_registers=2,
        pos_embed_prefix=False,
        pre_norm=True,
        key=jr.key(0),
    )
    image = jr.normal(jr.key(1), (3, 8, 8))
    maps = attention_maps(model, image)
    assert maps.shape == (2, 2, 1 + 2 + 4, 1 + 2 + 4)
    out, _ = transformer_attention_maps(model.transformer, _tokens(model, image))
    np.testing.assert_allclose(out, eqx.nn.inference_mode(model).forward_features(image), rtol=1e-6)


def test_attention_maps_errors():
    model = build_model("ViT", jr.key(0))
    with pytest.raises(ValueError, match="shape"):
        attention_maps(model, jnp.zeros((1, 16, 16)))
    cait = ev.CaiT(
        image_size=16, patch_size=8, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
        mlp_dim=16, dim_head=8, key=jr.key(0),
    )  # fmt: skip
    with pytest.raises(TypeError, match="CaiT"):
        attention_maps(cait, jnp.zeros((3, 16, 16)))  # pyright: ignore[reportArgumentType]
    parallel = Transformer(16, 1, 2, 8, 16, num_branches=2, key=jr.key(0))
    with pytest.raises(TypeError, match="single Attention"):
        transformer_attention_maps(parallel, jnp.zeros((4, 16)))


def test_rollout():
    maps = jax.nn.softmax(jr.normal(jr.key(0), (3, 2, 5, 5)), axis=-1)
    rollout = attention_rollout(maps)
    a = 0.5 * maps.mean(1) + 0.5 * jnp.eye(5)
    a = a / a.sum(-1, keepdims=True)
    np.testing.assert_allclose(rollout, a[2] @ a[1] @ a[0], rtol=1e-5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
    plain = attention_rollout(maps, residual=False)
    m = maps.mean(1)
    np.testing.assert_allclose(plain, m[2] @ m[1] @ m[0], rtol=1e-5)

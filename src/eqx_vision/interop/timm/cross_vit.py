"""timm's `CrossVit` (the `crossvit_*` models, `_dagger` ones included) as
`eqx_vision.TimmCrossViT`."""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from ...layers import Attention, PatchEmbedding, Stack
from ...models.cross_vit import (
    BranchEmbedding,
    BranchProjection,
    CrossAttentionBlock,
    MultiConvEmbedding,
    TimmCrossViT,
    TimmMultiScaleBlock,
)
from .._state_dict import StateDict, convert_conv, convert_layernorm, convert_linear, convert_stack
from ._common import (
    TimmArgs,
    TimmConfigError,
    convert_block,
    convert_conv_patch_embedding,
    norm_eps,
)


TIMM_CLASSES = ("CrossVit",)

_RATES = {  # timm's dropout rates and TimmCrossViT's arguments
    "proj_drop_rate": "dropout",
    "attn_drop_rate": "attn_dropout",
    "pos_drop_rate": "emb_dropout",
    "drop_rate": "head_dropout",
}


def build(args: TimmArgs, *, key: PRNGKeyArray) -> TimmCrossViT:
    """The `TimmCrossViT` of timm's constructor arguments."""
    patch_sizes = list(args.get("patch_size", [8, 16]))
    n = len(patch_sizes)
    if n not in (1, 2):
        args.unsupported(
            "patch_size",
            patch_sizes,
            "timm's CrossVit embeds every branch after the second with the class token and "
            "position embeddings of the second; one or two branches are supported",
        )
    scales = args.get("img_scale", [1.0, 1.0])
    scales = [scales] * 2 if isinstance(scales, int | float) else list(scales)
    if len(scales) < n:
        args.unsupported("img_scale", scales, f"one scale per branch ({n})")
    mlp_ratios = list(args.get("mlp_ratio", [2.0, 2.0, 4.0]))
    if len(mlp_ratios) < n:
        args.unsupported("mlp_ratio", mlp_ratios, f"one ratio per branch ({n})")
    args.expect("drop_path_rate", (0, 0.0), 0.0)  # training only; no drop-path here
    size = args.get("img_size", 224)
    options: dict[str, Any] = dict(
        image_size=size if isinstance(size, int) else tuple(size),
        num_classes=args.get("num_classes", 1000),
        dims=tuple(args.get("embed_dim", [192, 384])),
        patch_sizes=tuple(patch_sizes),
        depth=tuple(tuple(c) for c in args.get("depth", [[1, 3, 1]] * 3)),
        heads=tuple(args.get("num_heads", [6, 12])),
        mlp_ratios=tuple(float(r) for r in mlp_ratios[:n]),
        image_scales=tuple(float(s) for s in scales[:n]),
        multi_conv=args.get("multi_conv", False),
        crop_scale=args.get("crop_scale", False),
        qkv_bias=args.get("qkv_bias", True),
        norm_eps=norm_eps(args, 1e-6),
        pool="cls" if args.expect("global_pool", ("token", "avg"), "token") == "token" else "mean",
        channels=args.get("in_chans", 3),
        **{ours: float(args.get(theirs, 0.0)) for theirs, ours in _RATES.items()},
    )
    args.finish()
    try:
        return TimmCrossViT(**options, key=key)
    except ValueError as e:  # a configuration timm's names do not have
        raise TimmConfigError(f"{args.name}: {e}") from e


def convert(model: TimmCrossViT, sd: StateDict) -> TimmCrossViT:
    """The weights of a timm `CrossVit` state dict."""
    n = len(model.embeddings)
    subs: dict[str, Any] = {
        "embeddings": tuple(_convert_embedding(e, sd, i) for i, e in enumerate(model.embeddings)),
        "norms": tuple(convert_layernorm(m, sd, f"norm.{i}.") for i, m in enumerate(model.norms)),
    }
    if isinstance(model.blocks, Stack):
        subs["blocks"] = convert_stack(
            model.blocks, sd, lambda b: f"blocks.{b}.", _convert_multi_scale_block
        )
    else:
        subs["blocks"] = tuple(
            _convert_multi_scale_block(block, sd, f"blocks.{b}.")
            for b, block in enumerate(model.blocks)
        )
    if model.mlp_heads is not None:
        subs["mlp_heads"] = tuple(
            convert_linear(model.mlp_heads[i], sd, f"head.{i}.") for i in range(n)
        )
    return eqx.tree_at(lambda m: [getattr(m, k) for k in subs], model, list(subs.values()))


def _convert_embedding(m: BranchEmbedding, sd: StateDict, i: int) -> BranchEmbedding:
    """`patch_embed.{i}` (a convolution `proj`, or the `proj.{0,2,4}` of the multi-conv
    embedding), `cls_token_{i}` and `pos_embed_{i}`."""
    prefix = f"patch_embed.{i}."
    embedding = m.patch_embedding
    if isinstance(embedding, PatchEmbedding):
        embedding = convert_conv_patch_embedding(embedding, sd, prefix)
    else:
        assert isinstance(embedding, MultiConvEmbedding)
        convs = tuple(
            convert_conv(c, sd, f"{prefix}proj.{2 * j}.") for j, c in enumerate(embedding.convs)
        )
        embedding = eqx.tree_at(lambda e: e.convs, embedding, convs)
    return eqx.tree_at(
        lambda e: (e.patch_embedding, e.cls_token, e.pos_embedding),
        m,
        (
            embedding,
            sd.take(f"cls_token_{i}", m.cls_token, torch_shape=(1, *m.cls_token.shape)),
            sd.take(f"pos_embed_{i}", m.pos_embedding, torch_shape=(1, *m.pos_embedding.shape)),
        ),
    )


def _convert_multi_scale_block(
    m: TimmMultiScaleBlock, sd: StateDict, prefix: str
) -> TimmMultiScaleBlock:
    """timm's `MultiScaleBlock`: `blocks.{d}.{k}` (ViT blocks), `projs.{d}` and
    `revert_projs.{d}` (`nn.Sequential(LayerNorm, GELU, Linear)`), `fusion.{d}` (one
    cross-attention block, or an `nn.Sequential` of them when the configured cross depth
    is not 0)."""
    encoders = tuple(
        eqx.tree_at(
            lambda t: t.layers,
            encoder,
            convert_stack(
                encoder.layers, sd, lambda k, d=d: f"{prefix}blocks.{d}.{k}.", convert_block
            ),
        )
        for d, encoder in enumerate(m.encoders)
    )
    fusions = tuple(
        tuple(
            _convert_cross_block(
                block, sd, f"{prefix}fusion.{d}." + (f"{k}." if m.cross_depth else "")
            )
            for k, block in enumerate(fusion)
        )
        for d, fusion in enumerate(m.fusions)
    )
    projections = tuple(
        _convert_projection(p, sd, f"{prefix}projs.{d}.") for d, p in enumerate(m.projections)
    )
    reverts = tuple(
        _convert_projection(p, sd, f"{prefix}revert_projs.{d}.") for d, p in enumerate(m.reverts)
    )
    return eqx.tree_at(
        lambda b: (b.encoders, b.projections, b.fusions, b.reverts),
        m,
        (encoders, projections, fusions, reverts),
    )


def _convert_projection(m: BranchProjection, sd: StateDict, prefix: str) -> BranchProjection:
    return eqx.tree_at(
        lambda p: (p.norm, p.linear),
        m,
        (convert_layernorm(m.norm, sd, prefix + "0."), convert_linear(m.linear, sd, prefix + "2.")),
    )


def _convert_cross_block(m: CrossAttentionBlock, sd: StateDict, prefix: str) -> CrossAttentionBlock:
    """timm's `CrossAttentionBlock`: `norm1`, then `attn.wq`, `attn.wk`, `attn.wv` (the
    keys' and values' projections stacked into one `to_kv`) and `attn.proj`."""
    return eqx.tree_at(
        lambda b: (b.norm, b.attn),
        m,
        (
            convert_layernorm(m.norm, sd, prefix + "norm1."),
            _convert_cross_attention(m.attn, sd, prefix + "attn."),
        ),
    )


def _convert_cross_attention(m: Attention, sd: StateDict, prefix: str) -> Attention:
    assert m.to_q is not None and m.to_kv is not None and m.to_out is not None
    to_q = convert_linear(m.to_q, sd, prefix + "wq.")
    to_kv = eqx.tree_at(
        lambda lin: lin.weight,
        m.to_kv,
        _stacked(sd, [prefix + "wk.weight", prefix + "wv.weight"], m.to_kv.weight),
    )
    if to_kv.bias is not None:
        bias = _stacked(sd, [prefix + "wk.bias", prefix + "wv.bias"], to_kv.bias)
        to_kv = eqx.tree_at(lambda lin: lin.bias, to_kv, bias)
    to_out = convert_linear(m.to_out, sd, prefix + "proj.")
    return eqx.tree_at(lambda a: (a.to_q, a.to_kv, a.to_out), m, (to_q, to_kv, to_out))


def _stacked(sd: StateDict, keys: list[str], like: Any) -> jax.Array:
    """The tensors under `keys`, of equal shapes, concatenated along the first axis into
    one replacing `like`."""
    shape = (like.shape[0] // len(keys), *like.shape[1:])
    part = np.broadcast_to(np.zeros((), like.dtype), shape)  # a shape and dtype only
    return jnp.concatenate([sd.take(k, cast(Any, part)) for k in keys], axis=0)

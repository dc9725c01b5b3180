"""timm's `Cait` (CaiT, "Going deeper with Image Transformers") as `eqx_vision.CaiT`.

timm's blocks are CaiT's with every option set the timm way: a strided-convolution patch
embedding, biases in the query/key/value projections and in the talking-heads mixes
(`proj_l`, `proj_w`, `Linear` layers over the heads), LayerNorm epsilon 1e-6, a constant
LayerScale (`init_values`), and class-attention blocks without talking heads that
normalise `[cls; patches]` and take the queries from the class token only.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ...layers import Attention, FeedForward, Linear, TransformerBlock
from ...models.cait import CaiT
from .._state_dict import (
    CheckpointError,
    StateDict,
    convert_layernorm,
    convert_linear,
    convert_stack,
)
from ._common import (
    TimmArgs,
    convert_conv_patch_embedding,
    convert_mlp,
    mlp_hidden,
    norm_eps,
)


TIMM_CLASSES = ("Cait",)

# timm's building blocks of a Cait, by qualified name: the only ones eqx_vision builds.
_DEFAULT_LAYERS = {
    "block_layers": "timm.models.cait.LayerScaleBlock",
    "block_layers_token": "timm.models.cait.LayerScaleBlockClassAttn",
    "attn_block": "timm.models.cait.TalkingHeadAttn",
    "attn_block_token_only": "timm.models.cait.ClassAttn",
    "patch_layer": "timm.layers.patch_embed.PatchEmbed",
    "mlp_block": "timm.layers.mlp.Mlp",
    "mlp_block_token_only": "timm.layers.mlp.Mlp",
    "act_layer": "torch.nn.modules.activation.GELU",
}
# training-time rates eqx_vision's CaiT has no counterpart of (it drops whole layers, and
# one dropout rate covers attention, projections and MLPs)
_ZERO_RATES = ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def _square(args: TimmArgs, key: str, default: int) -> int:
    value = args.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    args.unsupported(key, value, "eqx_vision's CaiT takes square sizes")
    raise AssertionError  # unreachable


def build(args: TimmArgs, *, key: PRNGKeyArray) -> CaiT:
    """The `CaiT` of timm's `Cait` constructor arguments."""
    for name, default in _DEFAULT_LAYERS.items():
        args.expect(name, (default,), default)
    for name in _ZERO_RATES:
        args.expect(name, (0, 0.0), 0.0)
    args.expect("global_pool", ("token",), "token")
    dim, heads = args.get("embed_dim", 768), args.get("num_heads", 12)
    if dim % heads:
        args.unsupported("num_heads", heads, f"embed_dim={dim} must be a multiple of it")
    cls_depth = args.get("depth_token_only", 2)
    if cls_depth < 1:
        args.unsupported("depth_token_only", cls_depth, "at least one class-attention block")
    model = CaiT(
        image_size=_square(args, "img_size", 224),
        patch_size=_square(args, "patch_size", 16),
        num_classes=args.get("num_classes", 1000),
        dim=dim,
        depth=args.get("depth", 12),
        cls_depth=cls_depth,
        heads=heads,
        dim_head=dim // heads,
        mlp_dim=mlp_hidden(dim, args.get("mlp_ratio", 4.0)),
        emb_dropout=args.get("pos_drop_rate", 0.0),
        channels=args.get("in_chans", 3),
        patch_embedding="conv",
        qkv_bias=args.get("qkv_bias", True),
        talking_heads_bias=True,
        norm_eps=norm_eps(args, 1e-6),
        layer_scale=float(args.get("init_values", 1e-4)),
        cls_talking_heads=False,
        cls_norm_patches=True,
        cls_mlp_dim=mlp_hidden(dim, args.get("mlp_ratio_token_only", 4.0)),
        key=key,
    )
    args.finish()
    return model


def convert(model: CaiT, sd: StateDict) -> CaiT:
    """The weights of a timm `Cait` state dict."""
    dim = model.cls_token.shape[-1]
    subs: dict[str, Any] = {
        "to_patch_embedding": convert_conv_patch_embedding(
            model.to_patch_embedding, sd, "patch_embed."
        ),
        "pos_embedding": sd.take(
            "pos_embed", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
        ),
        "cls_token": sd.take("cls_token", model.cls_token, torch_shape=(1, 1, dim)),
        "patch_transformer": _convert_stack(model.patch_transformer, sd, "blocks.", _qkv),
        "cls_transformer": _convert_stack(model.cls_transformer, sd, "blocks_token_only.", _q_k_v),
        # timm's final norm runs over all tokens; only the class token reaches the head
        "head_norm": convert_layernorm(model.head_norm, sd, "norm."),
    }
    if model.mlp_head is not None:
        subs["mlp_head"] = convert_linear(model.mlp_head, sd, "head.")
    return eqx.tree_at(lambda m: [getattr(m, n) for n in subs], model, list(subs.values()))


def _convert_stack(encoder: Any, sd: StateDict, prefix: str, projections: Any) -> Any:
    def block(m: TransformerBlock, sd: StateDict, at: str) -> TransformerBlock:
        return _convert_block(m, sd, at, projections)

    layers = convert_stack(encoder.layers, sd, lambda i: f"{prefix}{i}.", block)
    return eqx.tree_at(lambda t: t.layers, encoder, layers)


def _convert_block(
    m: TransformerBlock, sd: StateDict, prefix: str, projections: Any
) -> TransformerBlock:
    """A `LayerScaleBlock` or `LayerScaleBlockClassAttn`: `norm1`, `attn`, `gamma_1`,
    `norm2`, `mlp`, `gamma_2`."""
    attn, ff = m.attn, m.ff
    assert isinstance(attn, Attention) and isinstance(ff, FeedForward)
    assert attn.norm is not None and attn.to_out is not None
    assert m.attn_scale is not None and m.ff_scale is not None
    a = prefix + "attn."
    subs: dict[str, Any] = {
        "norm": convert_layernorm(attn.norm, sd, prefix + "norm1."),
        "to_out": convert_linear(attn.to_out, sd, a + "proj."),
        **projections(attn, sd, a),
    }
    if attn.mix_pre is not None:
        subs.update(_talking_heads(attn, sd, a))
    attn = eqx.tree_at(lambda x: [getattr(x, n) for n in subs], attn, list(subs.values()))
    return eqx.tree_at(
        lambda b: (b.attn, b.attn_scale, b.ff, b.ff_scale),
        m,
        (
            attn,
            sd.take(prefix + "gamma_1", m.attn_scale),
            convert_mlp(ff, sd, prefix + "mlp.", prefix + "norm2."),
            sd.take(prefix + "gamma_2", m.ff_scale),
        ),
    )


def _talking_heads(attn: Attention, sd: StateDict, prefix: str) -> dict[str, Any]:
    """`proj_l` and `proj_w`, `Linear(heads, heads)` over the head axis: the mixes are
    stored `(heads_in, heads_out)`, the transpose of the Linear's weight."""
    out = {}
    for field, name in (("mix_pre", "proj_l"), ("mix_post", "proj_w")):
        like = getattr(attn, field)
        out[field] = sd.take(f"{prefix}{name}.weight", like, transform=np.transpose)
        out[field + "_bias"] = sd.take(f"{prefix}{name}.bias", getattr(attn, field + "_bias"))
    return out


def _qkv(attn: Attention, sd: StateDict, prefix: str) -> dict[str, Any]:
    """`TalkingHeadAttn.qkv`, one `Linear(dim, 3 * dim)`, into `to_q` (its first third) and
    `to_kv` (the rest: keys, then values)."""
    assert attn.to_q is not None and attn.to_kv is not None
    to_q, to_kv = attn.to_q, attn.to_kv
    fields = ["weight"] + ([] if to_q.bias is None else ["bias"])
    q_parts, kv_parts = [], []
    for field in fields:
        q_like, kv_like = getattr(to_q, field), getattr(to_kv, field)
        shape = (q_like.shape[0] + kv_like.shape[0], *q_like.shape[1:])
        value = _raw(sd, f"{prefix}qkv.{field}", shape)
        q_parts.append(_array(value[: q_like.shape[0]], q_like))
        kv_parts.append(_array(value[q_like.shape[0] :], kv_like))
    return {"to_q": _with(to_q, fields, q_parts), "to_kv": _with(to_kv, fields, kv_parts)}


def _q_k_v(attn: Attention, sd: StateDict, prefix: str) -> dict[str, Any]:
    """`ClassAttn`'s separate `q`, `k` and `v` Linears into `to_q` and `to_kv` (`k` and
    `v` stacked)."""
    assert attn.to_q is not None and attn.to_kv is not None
    to_kv = attn.to_kv
    fields = ["weight"] + ([] if to_kv.bias is None else ["bias"])
    parts = []
    for field in fields:
        like = getattr(to_kv, field)
        half = (like.shape[0] // 2, *like.shape[1:])
        k, v = (_raw(sd, f"{prefix}{n}.{field}", half) for n in ("k", "v"))
        parts.append(_array(np.concatenate([k, v], axis=0), like))
    return {
        "to_q": convert_linear(attn.to_q, sd, prefix + "q."),
        "to_kv": _with(to_kv, fields, parts),
    }


def _raw(sd: StateDict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    value = sd.raw(key)
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(
            f"shape mismatch for {key!r}: the model expects {tuple(shape)}, the state dict "
            f"has {tuple(value.shape)}."
        )
    if not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f"dtype mismatch for {key!r}: expected a floating-point tensor.")
    return value


def _array(value: np.ndarray, like: Any) -> Array:
    return jnp.array(value, dtype=like.dtype, copy=True)


def _with(linear: Linear, fields: list[str], values: list[Array]) -> Linear:
    return eqx.tree_at(lambda lin: [getattr(lin, f) for f in fields], linear, values)

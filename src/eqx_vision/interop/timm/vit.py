"""timm's `VisionTransformer` and `VisionTransformerDistilled` (the original ViT, AugReg,
DeiT, DeiT III, CLIP-style and register models) as `eqx_vision.ViT`."""

from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ...models.vit import ViT
from .._state_dict import StateDict, convert_layernorm, convert_linear, convert_stack
from ._common import (
    TimmArgs,
    convert_block,
    convert_conv_patch_embedding,
    mlp_hidden,
    norm_eps,
)


TIMM_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")

_ACTIVATIONS = {
    None: "gelu",
    "gelu": "gelu",
    "torch.nn.modules.activation.GELU": "gelu",
    "gelu_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
_ZERO_RATES = ("drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate")


def build(args: TimmArgs, *, key: PRNGKeyArray) -> ViT:
    """The `ViT` of timm's constructor arguments."""
    distilled = args.timm_class == "VisionTransformerDistilled"
    pool = args.expect("global_pool", ("token", "avg"), "token")
    dim, heads = args.get("embed_dim", 768), args.get("num_heads", 12)
    act = args.get("act_layer", None)
    if act not in _ACTIVATIONS:
        args.unsupported("act_layer", act, "supported: GELU, gelu_tanh, quick_gelu")
    fc_norm = args.get("fc_norm", None)
    for name, default in (
        ("qk_norm", False),
        ("scale_attn_norm", False),
        ("scale_mlp_norm", False),
        ("pool_include_prefix", False),
        ("dynamic_img_size", False),
        ("dynamic_img_pad", False),
        ("embed_norm_layer", None),
    ):
        args.expect(name, (default,), default)
    args.expect("proj_bias", (True,), True)
    args.expect("pos_embed", ("learn",), "learn")
    for name in ("embed_layer", "block_fn", "mlp_layer", "attn_layer"):
        if name in args:
            args.unsupported(name, args.get(name))
    for name in _ZERO_RATES:  # training-time options eqx_vision's ViT does not have
        args.expect(name, (0, 0.0), 0.0)
    args.get("weight_init", "")  # initialisation only: the weights are loaded
    args.get("fix_init", False)
    pre_norm = args.get("pre_norm", False)
    model = ViT(
        image_size=tuple(_pair(args.get("img_size", 224))),
        patch_size=tuple(_pair(args.get("patch_size", 16))),
        num_classes=args.get("num_classes", 1000),
        dim=dim,
        depth=args.get("depth", 12),
        heads=heads,
        dim_head=dim // heads,
        mlp_dim=mlp_hidden(dim, args.get("mlp_ratio", 4.0)),
        pool="cls" if pool == "token" else "mean",
        channels=args.get("in_chans", 3),
        emb_dropout=args.get("pos_drop_rate", 0.0),
        drop_path=float(args.get("drop_path_rate", 0.0)),
        patch_embedding="conv",
        patch_bias=not pre_norm,
        qkv_bias=args.get("qkv_bias", True),
        norm_eps=norm_eps(args, 1e-6),
        class_token=args.get("class_token", True),
        distillation_token=distilled,
        num_registers=args.get("reg_tokens", 0),
        pos_embed_prefix=not args.get("no_embed_class", False),
        pre_norm=pre_norm,
        final_norm=args.get("final_norm", True),
        fc_norm=pool == "avg" if fc_norm is None else fc_norm,
        layer_scale=args.get("init_values", None),
        activation=_ACTIVATIONS[act],
        key=key,
    )
    args.finish()
    return model


def _pair(size: Any) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def convert(model: ViT, sd: StateDict) -> ViT:
    """The weights of a timm ViT state dict."""
    dim = model.pos_embedding.shape[-1]
    subs: dict[str, Any] = {
        "to_patch_embedding": convert_conv_patch_embedding(
            model.to_patch_embedding, sd, "patch_embed."
        ),
        "pos_embedding": sd.take(
            "pos_embed", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
        ),
        "transformer": _convert_encoder(model, sd),
    }
    if model.cls_token.shape[0]:
        subs["cls_token"] = sd.take("cls_token", model.cls_token, torch_shape=(1, 1, dim))
    if model.dist_token is not None:
        subs["dist_token"] = sd.take("dist_token", model.dist_token, torch_shape=(1, 1, dim))
    if model.reg_tokens is not None:
        shape = (1, *model.reg_tokens.shape)
        subs["reg_tokens"] = sd.take("reg_token", model.reg_tokens, torch_shape=shape)
    for name, prefix in (("pre_norm", "norm_pre."), ("fc_norm", "fc_norm.")):
        if getattr(model, name) is not None:
            subs[name] = convert_layernorm(getattr(model, name), sd, prefix)
    for name, prefix in (("mlp_head", "head."), ("dist_head", "head_dist.")):
        if getattr(model, name) is not None:
            subs[name] = convert_linear(getattr(model, name), sd, prefix)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in subs], model, list(subs.values()))


def _convert_encoder(model: ViT, sd: StateDict) -> Any:
    encoder = model.transformer
    encoder = eqx.tree_at(
        lambda t: t.layers,
        encoder,
        convert_stack(encoder.layers, sd, lambda i: f"blocks.{i}.", convert_block),
    )
    if encoder.norm is not None:
        encoder = eqx.tree_at(
            lambda t: t.norm, encoder, convert_layernorm(encoder.norm, sd, "norm.")
        )
    return encoder

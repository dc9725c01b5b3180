"""timm's `PoolingVisionTransformer` (the `pit_*` names) as `eqx_vision.PiT`.

timm's PiT differs from vit-pytorch's in options `PiT` has: the patch stride is its own
argument, every stage's dimension is `base_dims[i] * heads[i]` with head dimension
`base_dims[i]` and MLP width `int(dim * mlp_ratio)`, the attention has qkv biases and
always an output projection, LayerNorms have epsilon 1e-6, the pooling has no `1x1`
convolution, the position embeddings (stored as a `(1, dim, h, w)` map) leave out the
class token, and the distilled names carry a distillation token whose head is averaged
with the class token's.
"""

from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import PRNGKeyArray

from ...models.pit import PiT, PiTPool
from .._state_dict import (
    StateDict,
    convert_conv,
    convert_layernorm,
    convert_linear,
    convert_stack,
)
from ._common import TimmArgs, convert_block, mlp_hidden


TIMM_CLASSES: tuple[str, ...] = ("PoolingVisionTransformer",)

_ZERO = (0, 0.0)


def _square(args: TimmArgs) -> int:
    size = args.get("img_size", 224)
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            args.unsupported("img_size", size, "PiT takes square images")
        size = size[0]
    return size


def _dropout(args: TimmArgs) -> float:
    """timm's `proj_drop_rate` and `attn_drop_rate`, which `PiT`'s one `dropout` rate
    covers when they are equal."""
    proj = args.get("proj_drop_rate", 0.0)
    attn = args.get("attn_drop_rate", 0.0)
    if proj != attn:
        args.unsupported(
            "attn_drop_rate", attn, f"PiT has one dropout rate; proj_drop_rate={proj!r}"
        )
    return float(proj)


def build(args: TimmArgs, *, key: PRNGKeyArray) -> PiT:
    """The `PiT` of timm's `PoolingVisionTransformer(**args)`."""
    image_size = _square(args)
    patch_size = args.get("patch_size", 16)
    stride = args.get("stride", 8)
    args.expect("stem_type", ("overlap",), "overlap")
    base_dims = tuple(args.get("base_dims", (48, 48, 48)))
    depth = tuple(args.get("depth", (2, 6, 4)))
    heads = tuple(args.get("heads", (2, 4, 8)))
    if not len(base_dims) == len(depth) == len(heads):
        args.unsupported(
            "base_dims", list(base_dims), "base_dims, depth and heads need one entry per stage"
        )
    mlp_ratio = float(args.get("mlp_ratio", 4.0))
    dims = tuple(b * h for b, h in zip(base_dims, heads, strict=True))
    args.expect("global_pool", ("token",), "token")
    args.expect("drop_rate", _ZERO, 0.0)
    args.expect("drop_path_rate", _ZERO, 0.0)
    model = PiT(
        image_size=image_size,
        patch_size=patch_size,
        stride=stride,
        num_classes=args.get("num_classes", 1000),
        dim=dims,
        depth=depth,
        heads=heads,
        dim_head=base_dims,
        mlp_dim=tuple(mlp_hidden(d, mlp_ratio) for d in dims),
        dropout=_dropout(args),
        emb_dropout=float(args.get("pos_drop_rate", 0.0)),
        channels=args.get("in_chans", 3),
        qkv_bias=True,
        project_out=True,
        norm_eps=1e-6,
        pool_pointwise=False,
        pos_embed_prefix=False,
        distillation_token=bool(args.get("distilled", False)),
        key=key,
    )
    args.finish()
    return model


def _convert_pool(m: PiTPool, sd: StateDict, prefix: str) -> PiTPool:
    """timm's `Pooling`: the depthwise `conv` and the class-token `fc`."""
    return eqx.tree_at(
        lambda p: (p.depthwise, p.cls_ff),
        m,
        (
            convert_conv(m.depthwise, sd, prefix + "conv."),
            convert_linear(m.cls_ff, sd, prefix + "fc."),
        ),
    )


def _prefix_tokens(model: PiT, sd: StateDict) -> tuple[Any, Any]:
    """The class (and distillation) token, stored together as `cls_token`
    `(1, num_tokens, dim)`."""
    num, dim = (1 if model.dist_token is None else 2), model.cls_token.shape[-1]
    like = np.empty((num, dim), model.cls_token.dtype)
    tokens = sd.take("cls_token", like, torch_shape=(1, num, dim))
    return tokens[:1], (None if model.dist_token is None else tokens[1:])


def convert(model: PiT, sd: StateDict) -> PiT:
    """The weights of a timm `PoolingVisionTransformer` state dict."""
    grid, dim = model.grid_sizes[0], model.pos_embedding.shape[-1]
    # the patch embedding: a convolution (dim, c, p, p), whose windows `unfold` flattens
    # in the same (c kh kw) order
    patch = model.to_patch_embedding
    c = patch.weight.shape[1] // model.patch_size**2
    weight = sd.take(
        "patch_embed.conv.weight",
        patch.weight,
        torch_shape=(dim, c, model.patch_size, model.patch_size),
    )
    assert patch.bias is not None
    patch = eqx.tree_at(
        lambda p: (p.weight, p.bias), patch, (weight, sd.take("patch_embed.conv.bias", patch.bias))
    )
    pos = sd.take(
        "pos_embed",
        model.pos_embedding,
        torch_shape=(1, dim, grid, grid),
        transform=lambda v: v.reshape(dim, grid * grid).T,
    )
    cls_token, dist_token = _prefix_tokens(model, sd)
    stages = tuple(
        eqx.tree_at(
            lambda s: s.layers,
            stage,
            convert_stack(
                stage.layers, sd, lambda j, i=i: f"transformers.{i}.blocks.{j}.", convert_block
            ),
        )
        for i, stage in enumerate(model.stages)
    )
    # the pooling before stage i + 1 belongs to timm's stage i + 1
    pools = tuple(
        _convert_pool(p, sd, f"transformers.{i + 1}.pool.") for i, p in enumerate(model.pools)
    )
    heads = [
        None if h is None else convert_linear(h, sd, name)
        for h, name in ((model.mlp_head, "head."), (model.dist_head, "head_dist."))
    ]
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.dist_token,
            m.pos_embedding,
            m.stages,
            m.pools,
            m.head_norm,
            m.mlp_head,
            m.dist_head,
        ),
        model,
        (
            patch,
            cls_token,
            dist_token,
            pos,
            stages,
            pools,
            convert_layernorm(model.head_norm, sd, "norm."),
            *heads,
        ),
        is_leaf=lambda x: x is None,
    )


__all__ = ["TIMM_CLASSES", "build", "convert"]

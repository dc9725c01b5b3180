"""timm's LeViT (`Levit`, `LevitDistilled`) as `TimmLeViT`, with its BatchNorm statistics.

timm's `levit_*` models keep their weights as Linears (`LinearNorm`, weights `(out, in)`)
and its `levit_conv_*` models as 1x1 convolutions (`ConvNorm`, weights `(out, in, 1, 1)`),
under the same names; both compute the same function, which `TimmLeViT` implements once.
"""

from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ...models.levit import (
    LinearBN,
    NormLinear,
    TimmLeViT,
    TimmLeViTAttention,
    TimmLeViTBlock,
    TimmLeViTMlp,
)
from .._state_dict import (
    StateDict,
    convert_batchnorm,
    convert_conv_bn,
    convert_linear,
    convert_stack_with_state,
)
from ._common import TimmArgs


TIMM_CLASSES: tuple[str, ...] = ("Levit", "LevitDistilled")

# timm's activation names (`get_act_layer`) that TimmLeViT has, by TimmLeViT's name.
_ACTIVATIONS = {
    "hard_swish": "hard_swish",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
}


def _activation(args: TimmArgs, key: str, default: str | None) -> str | None:
    name = args.get(key, default)
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        args.unsupported(key, name, "supported: " + ", ".join(map(repr, _ACTIVATIONS)))
    return _ACTIVATIONS[name.lower()]


def _options(args: TimmArgs) -> dict[str, Any]:
    """`TimmLeViT`'s arguments from timm's (every one read, unsupported ones rejected)."""
    if args.get("stem_backbone", None) is not None:
        args.unsupported("stem_backbone", args.get("stem_backbone"), "only timm's own stems are")
    args.expect("stem_stride", (None,), None)
    args.expect("global_pool", ("avg",), "avg")
    args.expect("down_op", ("subsample",), "subsample")
    args.expect("drop_path_rate", (0, 0.0), 0.0)
    embed_dim = args.get("embed_dim", [192])
    if not isinstance(embed_dim, list) or len(embed_dim) != len(args.get("depth", [12])):
        args.unsupported("embed_dim", embed_dim, "one width per stage, as many as depth has")
    pairs = {"num_heads": [3], "attn_ratio": 2.0, "mlp_ratio": 2.0}
    per_stage = {k: args.get(k, v) for k, v in pairs.items()}
    return dict(
        image_size=_tuple(args.get("img_size", 224)),
        num_classes=args.get("num_classes", 1000),
        dim=tuple(embed_dim),
        depth=tuple(args.get("depth", [12])),
        heads=_tuple(per_stage["num_heads"]),
        key_dim=args.get("key_dim", 64),
        value_ratio=_floats(per_stage["attn_ratio"]),
        mlp_ratio=_floats(per_stage["mlp_ratio"]),
        channels=args.get("in_chans", 3),
        stem_stride={"s16": 16, "s8": 8}[args.expect("stem_type", ("s16", "s8"), "s16")],
        activation=_activation(args, "act_layer", "hard_swish"),
        attn_activation=_activation(args, "attn_act_layer", None),
        distilled=args.timm_class == "LevitDistilled",
        dropout=float(args.get("drop_rate", 0.0)),
        use_conv=bool(args.get("use_conv", False)),
    )


def _tuple(value: Any) -> Any:
    """A list of models.json as the tuple it was in timm; any other value as it is."""
    return tuple(value) if isinstance(value, list) else value


def _floats(value: Any) -> Any:
    """A ratio, or a list of ratios (as a tuple), as floats (timm's may be ints)."""
    if isinstance(value, list):
        return tuple(_floats(v) for v in value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def build(args: TimmArgs, *, key: PRNGKeyArray) -> tuple[TimmLeViT, eqx.nn.State]:
    """The `TimmLeViT` of timm's `Levit`/`LevitDistilled` arguments, with its state."""
    options = _options(args)
    args.finish()
    return eqx.nn.make_with_state(TimmLeViT)(**options, key=key)


# Converters. `prefix` ends with a dot.


def _convert_linear_bn(
    m: LinearBN, sd: StateDict, prefix: str, state: eqx.nn.State, conv: bool
) -> tuple[LinearBN, eqx.nn.State]:
    """timm's `LinearNorm` (`linear.weight` `(out, in)`) or 1x1 `ConvNorm` (`(out, in, 1,
    1)`, `conv`), each with `bn`."""
    shape = (*m.linear.weight.shape, 1, 1) if conv else None
    weight = sd.take(prefix + "linear.weight", m.linear.weight, torch_shape=shape)
    bn, state = convert_batchnorm(m.bn, sd, prefix + "bn.", state)
    return eqx.tree_at(lambda t: (t.linear.weight, t.bn), m, (weight, bn)), state


def _convert_attention(
    m: TimmLeViTAttention, sd: StateDict, prefix: str, state: eqx.nn.State, conv: bool
) -> tuple[TimmLeViTAttention, eqx.nn.State]:
    """timm's `Attention` (`qkv`) or `AttentionDownsample` (`kv`, `q.ln`), then `proj.ln`
    and `attention_biases`."""
    subs: dict[str, Any] = {}
    for name, key in (("qkv", "qkv."), ("kv", "kv."), ("q", "q.ln.")):
        layer = getattr(m, name)
        if layer is not None:
            subs[name], state = _convert_linear_bn(layer, sd, prefix + key, state, conv)
    subs["proj"], state = _convert_linear_bn(m.proj, sd, prefix + "proj.ln.", state, conv)
    subs["attention_biases"] = sd.take(prefix + "attention_biases", m.attention_biases)
    return eqx.tree_at(lambda a: [getattr(a, n) for n in subs], m, list(subs.values())), state


def _convert_mlp(
    m: TimmLeViTMlp, sd: StateDict, prefix: str, state: eqx.nn.State, conv: bool
) -> tuple[TimmLeViTMlp, eqx.nn.State]:
    ln1, state = _convert_linear_bn(m.ln1, sd, prefix + "ln1.", state, conv)
    ln2, state = _convert_linear_bn(m.ln2, sd, prefix + "ln2.", state, conv)
    return eqx.tree_at(lambda f: (f.ln1, f.ln2), m, (ln1, ln2)), state


def _convert_block(
    m: TimmLeViTBlock, sd: StateDict, prefix: str, state: eqx.nn.State, conv: bool
) -> tuple[TimmLeViTBlock, eqx.nn.State]:
    """A `LevitBlock` (`attn`, `mlp`), or a `LevitDownsample` (`attn_downsample`, `mlp`)."""
    attn_name = "attn." if m.residual else "attn_downsample."
    attn, state = _convert_attention(m.attn, sd, prefix + attn_name, state, conv)
    mlp, state = _convert_mlp(m.mlp, sd, prefix + "mlp.", state, conv)
    return eqx.tree_at(lambda b: (b.attn, b.mlp), m, (attn, mlp)), state


def _convert_head(
    m: NormLinear, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[NormLinear, eqx.nn.State]:
    bn, state = convert_batchnorm(m.bn, sd, prefix + "bn.", state)
    linear = convert_linear(m.linear, sd, prefix + "linear.")
    return eqx.tree_at(lambda h: (h.bn, h.linear), m, (bn, linear)), state


def convert(model: TimmLeViT, sd: StateDict, state: eqx.nn.State) -> tuple[TimmLeViT, eqx.nn.State]:
    """The weights of a timm `Levit`/`LevitDistilled` state dict, and its BatchNorm
    statistics into `state`."""
    conv = model.use_conv
    stem = []
    for i, layer in enumerate(model.stem):
        prefix = f"stem.conv{i + 1}."
        layer, state = convert_conv_bn(layer, sd, prefix + "linear.", prefix + "bn.", state)
        stem.append(layer)
    downsamples, stages = [], []
    for i, stage in enumerate(model.stages):
        if i > 0:
            down, state = _convert_block(
                model.downsamples[i - 1], sd, f"stages.{i}.downsample.", state, conv
            )
            downsamples.append(down)
        stage, state = convert_stack_with_state(
            stage,
            sd,
            lambda j, i=i: f"stages.{i}.blocks.{j}.",
            lambda block, sd, at, block_state: _convert_block(block, sd, at, block_state, conv),
            state,
        )
        stages.append(stage)
    heads: list[NormLinear | None] = []
    for name in ("head", "head_dist"):
        head = getattr(model, name)
        if head is not None:
            head, state = _convert_head(head, sd, name + ".", state)
        heads.append(head)
    model = eqx.tree_at(
        lambda m: (m.stem, m.downsamples, m.stages, m.head, m.head_dist),
        model,
        (tuple(stem), tuple(downsamples), tuple(stages), *heads),
        is_leaf=lambda x: x is None,
    )
    return model, state

"""The reader of PyTorch `state_dict()`s and the converters of the layers both checkpoint
formats (vit-pytorch's and timm's) share.

A converter walks its module and takes every tensor it needs, by its name in the
checkpoint, from a `StateDict`. The reader checks each shape as it goes and, once the model's
converter is done, that every tensor was used exactly once; since modules are immutable,
a failed load leaves the caller's model untouched. The converters of whole models, one
module per architecture or family, build on the ones here.
"""

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..layers import (
    Attention,
    BatchNorm,
    ChannelLayerNorm,
    Conv2d,
    ConvBN,
    DepthwiseConv2d,
    FeedForward,
    LayerNorm,
    Linear,
    MapAttention,
    MapFeedForward,
    Parallel,
    PatchEmbedding,
    Stack,
    Transformer,
    TransformerBlock,
    stack_modules,
)


M = TypeVar("M", bound=eqx.Module)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, jax.ShapeDtypeStruct):
        return tuple(value.shape)
    return tuple(_to_numpy(value).shape)


class StateDict:
    """A read-once view of a state dict, with shape checks.

    `source` names the checkpoint's library in the messages (`"vit-pytorch"`, `"timm"`).
    Values may be `jax.ShapeDtypeStruct`s: such a shape-only state dict is read under
    `jax.eval_shape`, to check a converter's names and shapes without any weights.
    """

    def __init__(self, state_dict: Mapping[str, Any], *, source: str = "vit-pytorch"):
        loader = "from_" + source.replace("-", "_")
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{loader} expects a mapping of names to arrays, such as "
                f"`torch_module.state_dict()`; got {type(state_dict).__name__}."
            )
        self.source = source
        self._arrays = {str(k): v for k, v in state_dict.items()}
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def raw(self, key: str) -> np.ndarray:
        """The array stored under `key`, marked as used."""
        if key not in self._arrays:
            raise CheckpointError(f"missing key {key!r} in the {self.source} state dict.")
        if key in self._used:
            raise CheckpointError(f"key {key!r} was read twice.")
        self._used.add(key)
        value = self._arrays[key]
        if isinstance(value, jax.ShapeDtypeStruct):  # a shape-only state dict: zeros that
            return np.broadcast_to(np.zeros((), value.dtype), value.shape)  # take no memory
        return _to_numpy(value)

    def take(
        self,
        key: str,
        like: Array | np.ndarray,
        *,
        torch_shape: tuple[int, ...] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Array:
        """The array under `key`, checked and converted to replace `like`.

        The stored array must have shape `torch_shape` (by default `like.shape`); then
        `transform` (default: a reshape to `like.shape`) maps it to our layout.
        """
        expected = tuple(like.shape) if torch_shape is None else tuple(torch_shape)
        shape_only = isinstance(self._arrays.get(key), jax.ShapeDtypeStruct)
        value = self.raw(key)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"shape mismatch for {key!r}: the model expects {expected}, the state dict "
                f"has {tuple(value.shape)}."
            )
        if np.issubdtype(value.dtype, np.floating) != jnp.issubdtype(like.dtype, jnp.floating):
            raise CheckpointError(
                f"dtype mismatch for {key!r}: the model expects {like.dtype}, the state dict "
                f"has {value.dtype} (floating-point and integer tensors are not converted "
                "into each other)."
            )
        if shape_only:
            # A shape-only state dict checks a converter's names and shapes under
            # `jax.eval_shape`, where these zeros take no memory.
            return jnp.zeros(like.shape, like.dtype)
        value = transform(value) if transform is not None else value.reshape(like.shape)
        if tuple(value.shape) != tuple(like.shape):  # a converter bug, not a user error
            raise AssertionError(f"{key!r} converted to {value.shape}, expected {like.shape}")
        # A copy: `jnp.asarray` may alias the buffer of a torch tensor (or NumPy array),
        # whose in-place updates would then show up in the immutable model.
        return jnp.array(value, dtype=like.dtype, copy=True)

    def skip(self, key: str, shape: tuple[int, ...]) -> None:
        """Consume a tensor that has no counterpart here (a zero-size or derived buffer)."""
        value = self.raw(key)
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"shape mismatch for {key!r}: the model expects {tuple(shape)}, the state "
                f"dict has {tuple(value.shape)}."
            )

    def finish(self) -> None:
        """Raise `CheckpointError` if some tensor was never used, naming up to ten."""
        unused = sorted(set(self._arrays) - self._used)
        if unused:
            shown = ", ".join(f"{k!r} {tuple(_shape(self._arrays[k]))}" for k in unused[:10])
            more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
            raise CheckpointError(
                f"unexpected keys in the {self.source} state dict (not used by the model): "
                f"{shown}{more}."
            )


def replace(module: M, sd: StateDict, **fields: str) -> M:
    """`module` with each array field replaced by the tensor named by its keyword."""
    names = list(fields)
    values = [sd.take(fields[n], getattr(module, n)) for n in names]
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], module, values)


def required(module: M | None, what: str) -> M:
    """`module`, which the checkpoint has weights for; a `CheckpointError` if the model was
    built without it (e.g. with `num_classes=0`, or with an option of another format)."""
    if module is None:
        raise CheckpointError(
            f"the checkpoint has weights for {what}, which this model was built without."
        )
    return module


# Converters for the shared layers. `prefix` ends with a dot (or is empty).


def convert_linear(m: Linear, sd: StateDict, prefix: str) -> Linear:
    fields = {"weight": prefix + "weight"}
    if m.bias is not None:
        fields["bias"] = prefix + "bias"
    return replace(m, sd, **fields)


def convert_head(m: Linear | None, sd: StateDict, prefix: str) -> Linear | None:
    """A classifier, or `None` for a model built without one (`num_classes=0`)."""
    return None if m is None else convert_linear(m, sd, prefix)


def convert_layernorm(m: LayerNorm, sd: StateDict, prefix: str) -> LayerNorm:
    return replace(m, sd, weight=prefix + "weight", bias=prefix + "bias")


def convert_pointwise(m: Linear, sd: StateDict, prefix: str) -> Linear:
    """A `Linear` over channels stored as a 1x1 `torch.nn.Conv2d`: weight `(out, in, 1, 1)`."""
    weight = sd.take(prefix + "weight", m.weight, torch_shape=(*m.weight.shape, 1, 1))
    m = eqx.tree_at(lambda a: a.weight, m, weight)
    return replace(m, sd, bias=prefix + "bias") if m.bias is not None else m


def convert_attention(
    m: Attention, sd: StateDict, prefix: str, *, out: str = "to_out.0."
) -> Attention:
    """vit-pytorch's `Attention` naming: `norm`, `to_qkv` or `to_q`+`to_kv`, `to_out`.

    `out` is the output projection's name: `to_out.0.` when it is followed by a dropout in
    an `nn.Sequential`, `to_out.` when it is a bare Linear.
    """
    subs: dict[str, Callable[[Any], Any]] = {}
    if m.norm is not None:
        subs["norm"] = lambda x: convert_layernorm(x, sd, prefix + "norm.")
    for name in ("to_qkv", "to_q", "to_kv"):
        if getattr(m, name) is not None:
            subs[name] = lambda x, n=name: convert_linear(x, sd, f"{prefix}{n}.")
    if m.to_out is not None:
        subs["to_out"] = lambda x: convert_linear(x, sd, prefix + out)
    if m.reattn_norm is not None:
        subs["reattn_norm"] = lambda x: convert_layernorm(x, sd, prefix + "reattn_norm.1.")
    m = eqx.tree_at(
        lambda a: [getattr(a, n) for n in subs], m, [f(getattr(m, n)) for n, f in subs.items()]
    )
    arrays = {
        "mix_pre": "mix_heads_pre_attn",
        "mix_post": "mix_heads_post_attn",
        "reattn_weights": "reattn_weights",
        "temperature": "temperature",
    }
    present = {k: prefix + v for k, v in arrays.items() if getattr(m, k) is not None}
    return replace(m, sd, **present) if present else m


def convert_feedforward(
    m: FeedForward,
    sd: StateDict,
    prefix: str,
    *,
    indices: tuple[int, int, int] = (0, 1, 4),
    feature_map: bool = False,
) -> FeedForward:
    """vit-pytorch's `FeedForward`: an `nn.Sequential` named `net` with the norm and the two
    Linears at `indices`.

    With `feature_map=True`, the reference's feed-forward on feature maps (CvT, LeViT, ...):
    the Linears are stored as 1x1 convolutions and the norm as a channel LayerNorm (`g`,
    `b`).
    """
    norm_i, fc1_i, fc2_i = indices
    linear = convert_pointwise if feature_map else convert_linear
    m = eqx.tree_at(
        lambda f: (f.fc1, f.fc2),
        m,
        (
            linear(m.fc1, sd, f"{prefix}net.{fc1_i}."),
            linear(m.fc2, sd, f"{prefix}net.{fc2_i}."),
        ),
    )
    if m.norm is not None:
        norm = convert_channel_layernorm if feature_map else convert_layernorm
        m = eqx.tree_at(lambda f: f.norm, m, norm(m.norm, sd, f"{prefix}net.{norm_i}."))
    return m


def convert_parallel(
    m: Parallel[M], sd: StateDict, prefix: str, convert: Callable[[M, StateDict, str], M]
) -> Parallel[M]:
    """A `Parallel` from an `nn.ModuleList` of branches at `prefix` + `fns.{i}.`."""
    branches = [convert(m[i], sd, f"{prefix}fns.{i}.") for i in range(m.num_branches)]
    return eqx.tree_at(lambda p: p.branches, m, stack_modules(branches))


def convert_stack(
    m: Stack[M],
    sd: StateDict,
    prefix: Callable[[int], str],
    convert: Callable[[M, StateDict, str], M],
) -> Stack[M]:
    """A `Stack` whose block `i` is stored under `prefix(i)`."""
    blocks = [convert(m[i], sd, prefix(i)) for i in range(m.depth)]
    return eqx.tree_at(lambda s: s.blocks, m, stack_modules(blocks))


def convert_stack_with_state(
    m: Stack[M],
    sd: StateDict,
    prefix: Callable[[int], str],
    convert: Callable[[M, StateDict, str, eqx.nn.State], tuple[M, eqx.nn.State]],
    state: eqx.nn.State,
) -> tuple[Stack[M], eqx.nn.State]:
    """A `Stack` of stateful blocks (e.g. with BatchNorm) whose block `i` is under `prefix(i)`.

    The state of a stack is stored stacked like its parameters: one entry per `StateIndex`
    of the block, with a leading depth axis. `m[i]` is block `i`, but its indices still
    refer to those stacked entries, so each block is converted against a `State` holding
    only its own slice (`convert(block, sd, prefix, block_state) -> (block, block_state)`),
    and the converted slices are stacked back into `state`.
    """
    stacked = state.substate(m.blocks)
    blocks, states = [], []
    for i in range(m.depth):
        block_state = jax.tree.map(lambda a, i=i: a[i, ...], stacked)
        block, block_state = convert(m[i], sd, prefix(i), block_state)
        blocks.append(block)
        states.append(block_state)
    if states:
        state = state.update(jax.tree.map(lambda *a: jnp.stack(a), *states))
    return eqx.tree_at(lambda s: s.blocks, m, stack_modules(blocks)), state


def convert_block(
    m: TransformerBlock,
    sd: StateDict,
    prefix: str,
    *,
    attn: Callable[[Any, StateDict, str], Any] = convert_attention,
    ff: Callable[[Any, StateDict, str], Any] = convert_feedforward,
) -> TransformerBlock:
    """A block stored as an `nn.ModuleList([attn, ff])`: `{prefix}0.` and `{prefix}1.`."""
    return eqx.tree_at(
        lambda b: (b.attn, b.ff), m, (attn(m.attn, sd, prefix + "0."), ff(m.ff, sd, prefix + "1."))
    )


def convert_transformer(
    m: Transformer,
    sd: StateDict,
    prefix: str,
    *,
    block: Callable[[TransformerBlock, StateDict, str], TransformerBlock] = convert_block,
) -> Transformer:
    """vit-pytorch's `Transformer`: blocks at `layers.{i}.`, the final norm at `norm.`."""
    m = eqx.tree_at(
        lambda t: t.layers,
        m,
        convert_stack(m.layers, sd, lambda i: f"{prefix}layers.{i}.", block),
    )
    if m.norm is not None:
        m = eqx.tree_at(lambda t: t.norm, m, convert_layernorm(m.norm, sd, prefix + "norm."))
    return m


def convert_patch_embedding(
    m: PatchEmbedding, sd: StateDict, prefix: str, *, feature_map: bool = False, start: int = 1
) -> PatchEmbedding:
    """An `nn.Sequential(Rearrange, [LayerNorm], Linear, [LayerNorm])` at `prefix`.

    With `feature_map=True`, the patch embedding on feature maps of NesT and Twins: the
    norms are channel LayerNorms (`g`, `b`) and the Linear a 1x1 convolution. `start` is
    the index of the first norm in the Sequential (0 when there is no Rearrange in it).
    """
    index = start
    subs = {}
    for name in ("pre_norm", "linear", "post_norm"):
        sub = getattr(m, name)
        if sub is not None:
            if name == "linear":
                convert = convert_pointwise if feature_map else convert_linear
            else:
                convert = convert_channel_layernorm if feature_map else convert_layernorm
            subs[name] = convert(sub, sd, f"{prefix}{index}.")
            index += 1
    return eqx.tree_at(lambda p: [getattr(p, n) for n in subs], m, list(subs.values()))


def convert_conv(m: Conv2d | DepthwiseConv2d, sd: StateDict, prefix: str) -> Any:
    """A `torch.nn.Conv2d` (grouped or not): `weight` and optional `bias`."""
    fields = {"weight": prefix + "weight"}
    if m.bias is not None:
        fields["bias"] = prefix + "bias"
    return replace(m, sd, **fields)


def convert_channel_layernorm(m: ChannelLayerNorm | LayerNorm, sd: StateDict, prefix: str) -> Any:
    """The reference's channel LayerNorm: `g` and `b`, each of shape `(1, C, 1, 1)`, into a
    `ChannelLayerNorm` (or a `LayerNorm` applied to tokens, channels last)."""
    c = m.weight.shape[0]
    return eqx.tree_at(
        lambda n: (n.weight, n.bias),
        m,
        (
            sd.take(prefix + "g", m.weight, torch_shape=(1, c, 1, 1)),
            sd.take(prefix + "b", m.bias, torch_shape=(1, c, 1, 1)),
        ),
    )


def convert_batchnorm(
    m: BatchNorm, sd: StateDict, prefix: str, state: eqx.nn.State
) -> tuple[BatchNorm, eqx.nn.State]:
    """A `torch.nn.BatchNorm2d`: affine parameters into the module, running statistics and
    `num_batches_tracked` into `state`."""
    m = replace(m, sd, weight=prefix + "weight", bias=prefix + "bias")
    mean, var, count = state.get(m.state_index)
    new = (
        sd.take(prefix + "running_mean", mean),
        sd.take(prefix + "running_var", var),
        sd.take(prefix + "num_batches_tracked", count),
    )
    return m, state.set(m.state_index, new)


def convert_conv_bn(
    m: ConvBN, sd: StateDict, conv_prefix: str, bn_prefix: str, state: eqx.nn.State
) -> tuple[ConvBN, eqx.nn.State]:
    """A `torch.nn.Conv2d` at `conv_prefix` followed by a `BatchNorm2d` at `bn_prefix`."""
    bn, state = convert_batchnorm(m.bn, sd, bn_prefix, state)
    return eqx.tree_at(
        lambda c: (c.conv, c.bn), m, (convert_conv(m.conv, sd, conv_prefix), bn)
    ), state


def convert_map_attention(
    m: MapAttention,
    sd: StateDict,
    prefix: str,
    *,
    out: str = "to_out.0.",
    value_conv: str = "local_interactive_module.",
) -> MapAttention:
    """A `MapAttention` with `"linear"` projections (the attention on feature maps of
    CrossFormer, NesT, ScalableViT and Twins): a channel LayerNorm `norm` (`g`, `b`), the 1x1
    (or strided, for `kv_reduction > 1`) projection convolutions under their own names
    (`to_qkv`, `to_q`, `to_kv`, `to_k`, `to_v`), the value convolution at `value_conv` and
    the 1x1 output convolution at `out`. CvT's and LeViT's projections are converted by
    their own modules."""
    if not isinstance(m.to_out, Linear):
        raise TypeError("convert_map_attention converts MapAttention(projection='linear') only.")
    subs: dict[str, Any] = {}
    if m.norm is not None:
        subs["norm"] = convert_channel_layernorm(m.norm, sd, prefix + "norm.")
    for name in ("to_qkv", "to_q", "to_kv", "to_k", "to_v"):
        layer = getattr(m, name)
        if isinstance(layer, Linear):
            subs[name] = convert_pointwise(layer, sd, f"{prefix}{name}.")
        elif layer is not None:
            subs[name] = convert_conv(layer, sd, f"{prefix}{name}.")
    if m.value_conv is not None:
        subs["value_conv"] = convert_conv(m.value_conv, sd, prefix + value_conv)
    subs["to_out"] = convert_pointwise(m.to_out, sd, prefix + out)
    return eqx.tree_at(lambda a: [getattr(a, n) for n in subs], m, list(subs.values()))


def convert_map_feedforward(
    m: MapFeedForward, sd: StateDict, prefix: str, *, net: str = "net."
) -> MapFeedForward:
    """A feed-forward block on feature maps: an `nn.Sequential(channel LayerNorm, 1x1 conv,
    GELU, Dropout, 1x1 conv, ...)` at `prefix + net` (`net=""` for a bare Sequential)."""
    ff = m.ff
    assert ff.norm is not None
    subs = (
        convert_channel_layernorm(ff.norm, sd, f"{prefix}{net}0."),
        convert_pointwise(ff.fc1, sd, f"{prefix}{net}1."),
        convert_pointwise(ff.fc2, sd, f"{prefix}{net}4."),
    )
    return eqx.tree_at(lambda f: (f.ff.norm, f.ff.fc1, f.ff.fc2), m, subs)

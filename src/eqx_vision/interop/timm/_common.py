"""What every timm family's builder and converter share.

A family module (`vit.py`, `cait.py`, ...) holds, for the timm classes it names in
`TIMM_CLASSES`, a `build(args)` that constructs the eqx_vision model from timm's
constructor arguments (reading each through `TimmArgs`), and a `convert(model, sd)` (or
`convert(model, sd, state)` for models with BatchNorm) that loads a timm state dict.
"""

from typing import Any

import equinox as eqx

from ...layers import (
    Attention,
    FeedForward,
    PatchEmbedding,
    TransformerBlock,
)
from .._state_dict import StateDict, convert_layernorm, convert_linear


class TimmConfigError(ValueError):
    """A timm model name or configuration that eqx_vision cannot build."""


_MISSING: Any = object()


class TimmArgs:
    """The constructor arguments of one timm model, each read at most once.

    Values are as in `models.json`: tuples are lists, classes and functions their qualified
    names, partials `{"partial": name, "args": [...], "kwargs": {...}}`. A builder reads
    every argument it understands with `get`, states what it requires with `expect`, and
    calls `finish`, which rejects whatever was left unread, naming the timm option.
    """

    def __init__(self, name: str, timm_class: str, kwargs: dict[str, Any]):
        self.name = name
        self.timm_class = timm_class
        self._kwargs = dict(kwargs)
        self._read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._kwargs

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of `key`, or `default` when timm's default applies."""
        self._read.add(key)
        if key in self._kwargs:
            return self._kwargs[key]
        if default is _MISSING:
            raise TimmConfigError(f"{self.name}: timm's configuration has no {key!r}.")
        return default

    def expect(self, key: str, supported: tuple[Any, ...], default: Any) -> Any:
        """The value of `key` (`default` if absent), which must be one of `supported`."""
        value = self.get(key, default)
        if value not in supported:
            self.unsupported(key, value, "supported: " + ", ".join(map(repr, supported)))
        return value

    def unsupported(self, key: str, value: Any, why: str = "") -> None:
        """Raise the error for a timm option eqx_vision lacks."""
        detail = f" ({why})" if why else ""
        raise TimmConfigError(
            f"{self.name}: timm's {self.timm_class} option {key}={_show(value)} is not "
            f"supported by eqx_vision{detail}."
        )

    def finish(self) -> None:
        """Reject every argument no builder read."""
        unread = sorted(set(self._kwargs) - self._read)
        if unread:
            shown = ", ".join(f"{k}={_show(self._kwargs[k])}" for k in unread)
            raise TimmConfigError(
                f"{self.name}: timm's {self.timm_class} option(s) {shown} are not supported "
                "by eqx_vision."
            )


def _show(value: Any) -> str:
    if isinstance(value, dict) and "partial" in value:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in value["kwargs"].items())
        return f"partial({value['partial']}, {kwargs})"
    if isinstance(value, dict) and "object" in value:
        return f"<{value['object']} instance>"
    return repr(value)


def norm_eps(args: TimmArgs, default: float) -> float:
    """The epsilon of timm's `norm_layer` argument (a `LayerNorm` class or partial)."""
    norm = args.get("norm_layer", None)
    if norm is None:
        return default
    if isinstance(norm, dict) and norm.get("partial", "").endswith("LayerNorm"):
        if not norm["args"] and set(norm["kwargs"]) <= {"eps"}:
            return float(norm["kwargs"].get("eps", 1e-5))
    if isinstance(norm, str) and norm.endswith("LayerNorm"):
        return 1e-5
    args.unsupported("norm_layer", norm, "only LayerNorm is")
    raise AssertionError  # unreachable


def mlp_hidden(dim: int, ratio: float | int) -> int:
    """timm's MLP width: `int(dim * mlp_ratio)`."""
    return int(dim * ratio)


# Converters for timm's shared layers. `prefix` ends with a dot (or is empty).


def convert_conv_patch_embedding(m: PatchEmbedding, sd: StateDict, prefix: str) -> PatchEmbedding:
    """timm's `PatchEmbed`: a strided convolution `proj` (weight `(dim, c, p, p)`) into a
    `PatchEmbedding` without norms, flattened `(c p1 p2)` (`channels_first=True`), the same
    linear map."""
    if m.pre_norm is not None or m.post_norm is not None or not m.channels_first:
        raise TypeError("timm's patch embedding is a PatchEmbedding without norms, channels_first")
    out_dim, patch_dim = m.linear.weight.shape
    c = patch_dim // (m.patch_size[0] * m.patch_size[1])
    weight = sd.take(
        prefix + "proj.weight", m.linear.weight, torch_shape=(out_dim, c, *m.patch_size)
    )
    linear = eqx.tree_at(lambda lin: lin.weight, m.linear, weight)
    if linear.bias is not None:
        linear = eqx.tree_at(
            lambda lin: lin.bias, linear, sd.take(prefix + "proj.bias", linear.bias)
        )
    return eqx.tree_at(lambda p: p.linear, m, linear)


def convert_attention(m: Attention, sd: StateDict, prefix: str, norm: str | None) -> Attention:
    """timm's `Attention` (`qkv`, `proj`) at `prefix`, with its pre-norm stored at `norm`
    (the block's `norm1.`), if the attention has one."""
    subs: dict[str, Any] = {}
    if m.norm is not None:
        assert norm is not None
        subs["norm"] = convert_layernorm(m.norm, sd, norm)
    assert m.to_qkv is not None and m.to_out is not None
    subs["to_qkv"] = convert_linear(m.to_qkv, sd, prefix + "qkv.")
    subs["to_out"] = convert_linear(m.to_out, sd, prefix + "proj.")
    return eqx.tree_at(lambda a: [getattr(a, n) for n in subs], m, list(subs.values()))


def convert_mlp(m: FeedForward, sd: StateDict, prefix: str, norm: str | None) -> FeedForward:
    """timm's `Mlp` (`fc1`, `fc2`) at `prefix`, with its pre-norm stored at `norm`."""
    subs: dict[str, Any] = {
        "fc1": convert_linear(m.fc1, sd, prefix + "fc1."),
        "fc2": convert_linear(m.fc2, sd, prefix + "fc2."),
    }
    if m.norm is not None:
        assert norm is not None
        subs["norm"] = convert_layernorm(m.norm, sd, norm)
    return eqx.tree_at(lambda f: [getattr(f, n) for n in subs], m, list(subs.values()))


def convert_block(m: TransformerBlock, sd: StateDict, prefix: str) -> TransformerBlock:
    """timm's ViT `Block`: `norm1`, `attn`, `ls1.gamma`, `norm2`, `mlp`, `ls2.gamma`."""
    assert isinstance(m.attn, Attention) and isinstance(m.ff, FeedForward)
    subs: dict[str, Any] = {
        "attn": convert_attention(m.attn, sd, prefix + "attn.", prefix + "norm1."),
        "ff": convert_mlp(m.ff, sd, prefix + "mlp.", prefix + "norm2."),
    }
    if m.attn_scale is not None:
        subs["attn_scale"] = sd.take(prefix + "ls1.gamma", m.attn_scale)
    if m.ff_scale is not None:
        subs["ff_scale"] = sd.take(prefix + "ls2.gamma", m.ff_scale)
    return eqx.tree_at(lambda b: [getattr(b, n) for n in subs], m, list(subs.values()))

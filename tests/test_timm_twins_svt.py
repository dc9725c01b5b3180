"""timm's `Twins` (the `twins_svt_*` names) loaded into `eqx_vision.TwinsSVT`."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import torch

import eqx_vision as ev
from reference import perturb_, rel_err
from timm_reference import import_timm


def _array(t: Any) -> jax.Array:
    return jnp.asarray(t.detach().numpy())


def test_spatial_reduction_attention_matches_timm():
    """MapAttention with `spatial_reduction` (and a map that the reduction does not tile,
    5x4 by 2) against timm's `GlobalSubSampleAttn` after its block's LayerNorm."""
    import_timm()
    from timm.models.twins import GlobalSubSampleAttn

    dim, heads, sr, size = 16, 2, 2, (5, 4)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    attn = GlobalSubSampleAttn(dim, heads, sr_ratio=sr).eval()
    perturb_(norm)
    perturb_(attn, seed=1)
    m = ev.layers.MapAttention(
        dim,
        heads=heads,
        dim_head=dim // heads,
        projections="q_kv",
        kv_reduction=sr,
        spatial_reduction=True,
        qkv_bias=True,
        norm_eps=1e-6,
        key=jax.random.key(0),
    )
    assert m.kv_reduce is not None and m.kv_reduce_norm is not None
    block_norm, attn_sd = norm.state_dict(), attn.state_dict()
    tensors = [block_norm["weight"], block_norm["bias"]] + [
        attn_sd[f"{layer}.{p}"]
        for layer in ("q", "sr", "norm", "kv", "proj")
        for p in ("weight", "bias")
    ]
    m = eqx.tree_at(
        lambda m: (
            m.norm.weight,
            m.norm.bias,
            m.to_q.weight,
            m.to_q.bias,
            m.kv_reduce.weight,
            m.kv_reduce.bias,
            m.kv_reduce_norm.weight,
            m.kv_reduce_norm.bias,
            m.to_kv.weight,
            m.to_kv.bias,
            m.to_out.weight,
            m.to_out.bias,
        ),
        m,
        tuple(_array(t) for t in tensors),
    )
    x = torch.randn(dim, *size)
    with torch.no_grad():
        tokens = x.reshape(dim, -1).T[None]
        expected = attn(norm(tokens), size)[0].T.reshape(dim, *size)
    out = m(_array(x))
    # measured 2.9e-7
    assert rel_err(out, expected.numpy()) < 1e-6

"""timm's NesT (`Nest`) in eqx_vision: the layer options it needs, its parity with timm."""

import jax
import pytest

from eqx_vision.layers import MapAttention, MapFeedForward


def test_map_attention_qkv_bias_and_norm_eps():
    attn = MapAttention(8, heads=2, dim_head=4, qkv_bias=True, norm_eps=1e-6, key=jax.random.key(0))
    assert attn.to_qkv is not None and attn.to_qkv.bias is not None
    assert attn.to_qkv.bias.shape == (24,)
    assert attn.norm is not None and attn.norm.eps == 1e-6
    plain = MapAttention(8, heads=2, dim_head=4, key=jax.random.key(0))
    assert plain.to_qkv is not None and plain.to_qkv.bias is None
    assert plain.norm is not None and plain.norm.eps == 1e-5
    ff = MapFeedForward(8, 16, norm_eps=1e-6, key=jax.random.key(0))
    assert ff.ff.norm is not None and ff.ff.norm.eps == 1e-6
    with pytest.raises(ValueError, match="qkv_bias"):
        MapAttention(8, heads=2, dim_head=4, projection="conv_bn", projections="q_k_v",
                     qkv_bias=True, key=jax.random.key(0))  # fmt: skip

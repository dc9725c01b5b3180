"""timm's ViT family (VisionTransformer, VisionTransformerDistilled) against eqx_vision's ViT.

Reduced models (2 blocks, small widths and images) of every kind of configuration timm's
names use, in the fast suite; full-size names, slow-marked.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.interop import timm as ev_timm
from reference import perturb_, rel_err
from timm_reference import check_timm_parity, timm_model


SMALL: dict[str, Any] = dict(depth=2, embed_dim=64, num_heads=2, img_size=32)

# One reduced model per kind of configuration: (name, overrides, input size).
KINDS: dict[str, tuple[str, dict[str, Any], int]] = {
    # the original ViT / AugReg: class token, qkv bias, eps 1e-6
    "classic": ("vit_small_patch16_224", dict(SMALL, patch_size=8), 32),
    # DeiT distilled: a distillation token and head, logits averaged
    "distilled": ("deit_tiny_distilled_patch16_224", dict(SMALL, patch_size=8), 32),
    # DeiT III: LayerScale, position embeddings without the class token
    "deit3": ("deit3_small_patch16_224", dict(SMALL, patch_size=8), 32),
    # CLIP: a norm before the encoder, eps 1e-5, no patch bias, a projection head
    "clip": ("vit_base_patch16_clip_224.openai", dict(SMALL, patch_size=8), 32),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", dict(SMALL, patch_size=8), 32),
    # no class token, average pooling, no qkv bias, LayerScale
    "gap": ("vit_medium_patch16_gap_256", dict(SMALL, patch_size=8), 32),
    # average pooling with its own norm (fc_norm), registers
    "reg_gap": ("vit_betwixt_patch16_reg4_gap_256", dict(SMALL, patch_size=8), 32),
    # registers without position embeddings, LayerScale; a 10-class head
    "registers": ("vit_small_patch14_reg4_dinov2", dict(SMALL, patch_size=8, num_classes=10), 32),
    # tanh-approximated GELU (SigLIP without the attention-pool head)
    "gelu_tanh": ("vit_base_patch16_siglip_gap_224", dict(SMALL, patch_size=8, num_classes=5), 32),
    # a patch size that does not divide the image: the convolution drops the border
    "patch14_crop": ("vit_large_patch14_clip_224.openai", dict(SMALL, patch_size=14), 32),
}
# Measured relative errors of the logits (float32, perturbed weights): 2.9e-7 (gap) to
# 1.6e-6 (registers).
TOL = 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity(kind):
    name, overrides, size = KINDS[kind]
    check_timm_parity(name, (3, size, size), tol=TOL, grad_tol=1e-3, **overrides)


def test_num_classes_zero_returns_timm_features():
    """A name without a classifier (`num_classes=0`): `forward_features` returns timm's
    `forward_features`, the model timm's pooled features."""
    name, overrides = "vit_base_patch16_224.mae", {**SMALL, "patch_size": 8}
    torch_model = timm_model(name, **overrides)
    perturb_(torch_model)
    model = ev.from_timm(name, torch_model.state_dict(), **overrides)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch_model.forward_features(x).numpy()
        pooled = torch_model(x).numpy()
    out = jax.vmap(model.forward_features)(jnp.asarray(x.numpy()))
    assert rel_err(out, expected) <= TOL
    assert rel_err(jax.vmap(model)(jnp.asarray(x.numpy())), pooled) <= TOL


def test_new_head():
    """`num_classes` replaces a classifier of another size, keeps one of the same size, and
    `0` removes it; the body is unchanged."""
    name, overrides = "vit_small_patch16_224", {**SMALL, "patch_size": 8}
    torch_model = timm_model(name, **overrides)
    sd = torch_model.state_dict()
    loaded = ev.from_timm(name, sd, **overrides)
    same = ev.from_timm(name, sd, num_classes=1000, **overrides)
    assert loaded.mlp_head is not None and same.mlp_head is not None
    np.testing.assert_array_equal(same.mlp_head.weight, loaded.mlp_head.weight)
    ten = ev.from_timm(name, sd, num_classes=10, key=jax.random.key(1), **overrides)
    assert ten.mlp_head is not None and ten.mlp_head.weight.shape == (10, 64)
    bound = 1 / np.sqrt(64)
    assert 0 < float(jnp.abs(ten.mlp_head.weight).max()) <= bound
    np.testing.assert_array_equal(ten.pos_embedding, loaded.pos_embedding)
    headless = ev.from_timm(name, sd, num_classes=0, **overrides)
    assert headless.mlp_head is None
    assert headless(jnp.zeros((3, 32, 32))).shape == (64,)


def test_checkpoint_errors():
    name, overrides = "vit_small_patch16_224", {**SMALL, "patch_size": 8}
    sd = {k: v.numpy() for k, v in timm_model(name, **overrides).state_dict().items()}
    bad = dict(sd, **{"blocks.1.attn.qkv.weight": np.zeros((3, 64))})
    with pytest.raises(
        ev.CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight.*\(192, 64\).*\(3, 64\)"
    ):
        ev.from_timm(name, bad, **overrides)
    missing = {k: v for k, v in sd.items() if k != "norm.bias"}
    with pytest.raises(ev.CheckpointError, match="missing key 'norm.bias' in the timm state dict"):
        ev.from_timm(name, missing, **overrides)
    extra = dict(sd, **{"blocks.2.norm1.weight": np.zeros(64)})
    with pytest.raises(ev.CheckpointError, match=r"unexpected keys .*'blocks\.2\.norm1\.weight'"):
        ev.from_timm(name, extra, **overrides)


def test_not_a_state_dict(no_typecheck):
    with pytest.raises(TypeError, match="mapping of names to arrays"):
        ev.from_timm("vit_small_patch16_224", [1, 2])  # pyright: ignore[reportArgumentType]
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        ev.from_timm("vit_small_patch16_224", "/nonexistent/model.safetensors")


def test_unsupported_options_are_named():
    with pytest.raises(ev_timm.TimmConfigError, match="global_pool='map'"):
        ev_timm.check("vit_so400m_patch14_siglip_224")
    with pytest.raises(ev_timm.TimmConfigError, match="qk_norm=True"):
        ev_timm.check("vit_large_patch14_xp_224")
    with pytest.raises(ev_timm.TimmConfigError, match="block_fn="):
        ev_timm.check("vit_base_patch16_rpn_224")
    with pytest.raises(ev_timm.TimmConfigError, match="attn_drop_rate=0.1"):
        ev_timm.build("vit_small_patch16_224", key=jax.random.key(0), attn_drop_rate=0.1)


def test_drop_path_rate():
    """timm's `drop_path_rate` is the ViT's stochastic depth (training only)."""
    model = ev_timm.build(
        "vit_small_patch16_224", key=jax.random.key(0), drop_path_rate=0.1, **SMALL
    )
    assert model.transformer.drop_path.p == 0.1


# Full-size names, one per kind: logits of one image at the name's own size.
FULL = [
    "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "deit_small_distilled_patch16_224.fb_in1k",
    "deit3_small_patch16_224.fb_in1k",
    "vit_base_patch16_clip_224.openai",
    "vit_medium_patch16_gap_256.sw_in12k_ft_in1k",
    "vit_small_patch14_reg4_dinov2.lvd142m",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_parity(name):
    torch_model = timm_model(name)
    perturb_(torch_model, scale=0.02)
    model = ev.from_timm(name, torch_model.state_dict())
    x = torch.randn(1, 3, *model.image_size)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    out = jax.jit(jax.vmap(model))(jnp.asarray(x.numpy()))
    # measured: 7.0e-7 (gap) to 1.9e-6 (distilled)
    assert rel_err(out, expected) <= 1e-5

"""The backbone API of ViT: its contract, and its intermediate outputs equal to
vit-pytorch's residual stream after each block and to timm's `forward_intermediates`."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from reference import perturb_, reference, rel_err
from timm_reference import import_timm, timm_model


TINY = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64)


@pytest.mark.parametrize(
    "options",
    [{}, dict(pool="mean"), dict(patch_embedding="conv", distillation_token=True, num_registers=2,
     pos_embed_prefix=False, fc_norm=True, pool="cls", qkv_bias=True)],
)  # fmt: skip
def test_contract(options):
    model = ev.ViT(**{**TINY, **options}, key=jr.key(0))
    # a strided-convolution embedding takes any size (it drops the border)
    bad = None if options.get("patch_embedding") == "conv" else (30, 32)
    check_backbone(model, (32, 32), new_size=(48, 40), bad_size=bad)


def test_intermediates_equal_vit_pytorch():
    """The tokens after each block are vit-pytorch's residual stream after each block's
    feed-forward (forward hooks). Measured: at most 4e-7."""
    torch_model = reference("vit").ViT(**TINY)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.ViT(**TINY, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    names = [f"transformer.layers.{i}.1" for i in range(3)]
    expected = torch_outputs(torch_model, names, x, residual=True)
    final, outputs = model.forward_intermediates(
        jnp.asarray(x[0].numpy()), output_fmt="tokens", prefix_tokens=True
    )
    for (patches, prefix), e in zip(outputs, expected, strict=True):
        assert rel_err(jnp.concatenate([prefix, patches]), e[0]) <= 1e-5
    with torch.no_grad():
        tokens = torch_model.transformer(
            torch_model.dropout(
                torch.cat(
                    [torch_model.cls_token.expand(1, 1, -1), torch_model.to_patch_embedding(x)], 1
                )
                + torch_model.pos_embedding
            )
        )
    assert rel_err(final, tokens[0].numpy()) <= 1e-5


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_small_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_base_patch16_reg4_gap_256", dict(class_token=False)),
    ],
)
def test_intermediates_equal_timm(name, overrides):
    """timm's `forward_intermediates` (maps without the prefix tokens, then the prefix
    tokens, with and without the final norm). Measured: at most 1e-6."""
    import_timm()
    small: dict[str, Any] = dict(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, **overrides
    )
    torch_model = timm_model(name, **small)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_timm(name, torch_model.state_dict(), **small)
    x = torch.randn(1, 3, 32, 32)
    for norm in (False, True):
        with torch.no_grad():
            final, inter = torch_model.forward_intermediates(
                x, indices=[0, 2], norm=norm, return_prefix_tokens=True
            )
        ours_final, ours = model.forward_intermediates(
            jnp.asarray(x[0].numpy()), indices=[0, 2], norm=norm, prefix_tokens=True
        )
        assert rel_err(ours_final, final[0].numpy()) <= 1e-5
        for (y, prefix), (ey, eprefix) in zip(ours, inter, strict=True):
            assert rel_err(y, ey[0].numpy()) <= 1e-5
            if model.num_prefix_tokens:
                assert rel_err(prefix, eprefix[0].numpy()) <= 1e-5


@pytest.mark.parametrize(
    "old, new, prefix", [((4, 4), (6, 6), True), ((4, 4), (3, 5), False), ((6, 6), (2, 2), True)]
)
def test_set_image_size_equals_timm(old, new, prefix):
    """`set_image_size` gives timm's `set_input_size` model: its position embeddings (timm's
    `resample_abs_pos_embed`, bicubic and antialiased) and its outputs. Measured: 2e-7 for
    the embeddings, 1e-6 for the logits."""
    import_timm()
    name = "vit_small_patch16_224" if prefix else "vit_medium_patch16_reg4_gap_256"
    small: dict[str, Any] = dict(
        img_size=(old[0] * 8, old[1] * 8), patch_size=8, embed_dim=64, depth=2, num_heads=2
    )
    torch_model = timm_model(name, **small)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_timm(name, torch_model.state_dict(), **small)
    torch_model.set_input_size(img_size=(new[0] * 8, new[1] * 8))
    resized = ev.set_image_size(model, (new[0] * 8, new[1] * 8))
    assert rel_err(resized.pos_embedding, torch_model.pos_embed[0].detach().numpy()) <= 1e-6
    x = torch.randn(1, 3, new[0] * 8, new[1] * 8)
    with torch.no_grad():
        expected = torch_model(x)[0].numpy()
    assert rel_err(eqx.filter_jit(resized)(jnp.asarray(x[0].numpy())), expected) <= 1e-5


def test_reset_head_keeps_the_body():
    model = ev.ViT(**TINY, distillation_token=True, key=jr.key(0))
    new = ev.reset_head(model, 5, key=jr.key(3))
    assert new.mlp_head is not None and new.mlp_head.weight.shape == (5, 32)
    assert new.dist_head is not None and new.dist_head.weight.shape == (5, 32)
    np.testing.assert_array_equal(new.pos_embedding, model.pos_embedding)
    with pytest.raises(ValueError, match="key"):
        ev.reset_head(model, 5)
    with pytest.raises(ValueError, match="num_classes"):
        ev.reset_head(model, -1)

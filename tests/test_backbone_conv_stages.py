"""The backbone API of the models with convolutional stages (CvT, LeViT, TimmLeViT, PiT):
their contract, their stage outputs equal to vit-pytorch's (forward hooks) and to timm's
`forward_intermediates`, new image sizes, and their attention maps in image
coordinates."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import torch

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from eqx_vision.inspect import AttentionMap, image_attention
from reference import perturb_, reference, rel_err


def _image(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    return x, jnp.asarray(x[0].numpy())


def _check_maps(maps: list[AttentionMap], image_size: tuple[int, int]) -> None:
    """Every map's cells over the image, the attention each key receives averaged over the
    queries: a distribution over the keys (sums to one) for each layer and head."""
    for m in maps:
        assert m.maps.shape[2] * m.stride[0] >= image_size[0] - m.stride[0], m.name
        assert m.maps.shape[3] * m.stride[1] >= image_size[1] - m.stride[1], m.name
        np.testing.assert_allclose(np.asarray(m.maps.sum(axis=(2, 3))), 1.0, rtol=1e-5)
        assert m.on_image(image_size).shape == (*m.maps.shape[:2], *image_size)


# CvT ------------------------------------------------------------------------------------

CVT = dict(
    num_classes=5, s1_emb_dim=8, s1_emb_kernel=3, s1_emb_stride=2, s1_heads=1, s1_depth=2,
    s1_mlp_mult=2, s2_emb_dim=16, s2_heads=2, s2_depth=1, s2_mlp_mult=2, s3_emb_dim=16,
    s3_heads=2, s3_depth=2, s3_mlp_mult=2,
)  # fmt: skip


def _cvt(**overrides: Any) -> tuple[ev.CvT, eqx.nn.State]:
    return eqx.nn.make_with_state(ev.CvT)(**{**CVT, **overrides}, key=jr.key(0))


def test_cvt_contract():
    model, state = _cvt()
    check_backbone(model, (32, 32), state=state, new_size=(48, 40))
    assert [i.reduction for i in model.feature_info] == [(2, 2), (4, 4), (8, 8)]
    assert [i.channels for i in model.feature_info] == [8, 16, 16]
    assert ev.set_image_size(model, (9, 13)) is model  # any size the convolutions reduce
    headless, _ = _cvt(num_classes=0)
    assert headless.head is None


def test_cvt_intermediates_equal_vit_pytorch():
    """Each stage's output map is the output of vit-pytorch's `layers[i]` (forward hooks).
    Measured: at most 6e-7."""
    torch_model = reference("cvt").CvT(**CVT)
    perturb_(torch_model)
    torch_model.eval()
    model, state = _cvt()
    model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    model = eqx.nn.inference_mode(model)
    x, jx = _image((3, 32, 40))
    expected = torch_outputs(torch_model, [f"layers.{i}" for i in range(3)], x)
    (final, outputs), _ = model.forward_intermediates(jx, state)
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    assert rel_err(final, expected[-1][0]) <= 5e-6
    tokens, _ = model.forward_intermediates(
        jx, state, indices=[1], output_fmt="tokens", intermediates_only=True
    )
    assert rel_err(tokens[0], expected[1][0].reshape(16, -1).T) <= 5e-6


def test_cvt_attention_maps():
    model, state = _cvt()
    model = eqx.nn.inference_mode(model)
    _, image = _image((3, 32, 40))
    maps = eqx.filter_jit(image_attention)(model, image, state)
    assert [m.name for m in maps] == ["stages[0]", "stages[1]", "stages[2]"]
    # layers, heads, and the key grids of the stride-2 key/value projections
    assert [m.maps.shape for m in maps] == [(2, 1, 8, 10), (1, 2, 4, 5), (2, 2, 2, 3)]
    assert [m.stride for m in maps] == [(4, 4), (8, 8), (16, 16)]
    _check_maps(maps, (32, 40))
    # queries of zero: every key gets the same attention
    flat = eqx.tree_at(
        lambda m: m.stages[1].blocks.blocks.attn.to_q.pointwise.weight,
        model,
        replace_fn=jnp.zeros_like,
    )
    np.testing.assert_allclose(
        np.asarray(image_attention(flat, image, state)[1].maps), 1 / 20, rtol=1e-6
    )

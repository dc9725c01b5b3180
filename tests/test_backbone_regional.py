"""The backbone API of CrossFormer, RegionViT and T2T-ViT: the contract, the intermediate
outputs equal to vit-pytorch's (forward hooks), and their attention maps in image
coordinates."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch

import eqx_vision as ev
from backbone import check_backbone, torch_outputs
from eqx_vision.inspect import image_attention
from reference import perturb_, reference, rel_err


# --- CrossFormer -------------------------------------------------------------------------

CROSSFORMER: dict[str, Any] = dict(
    dim=32,
    depth=(1, 2, 1, 1),
    global_window_size=(4, 2, 2, 1),
    local_window_size=2,
    cross_embed_kernel_sizes=((2, 4), (2,), (2, 4), (2,)),
    cross_embed_strides=2,
    num_classes=10,
)
# a stage without blocks, three kernels, one channel, a rectangular image
CROSSFORMER_RECT: dict[str, Any] = dict(
    dim=(32, 64, 32, 64),
    depth=(2, 1, 0, 1),
    global_window_size=(2, 1, 1, 1),
    local_window_size=(4, 2, 2, 1),
    cross_embed_kernel_sizes=((4, 8, 16), (2, 4), (2,), (2, 4)),
    cross_embed_strides=(4, 2, 2, 2),
    num_classes=7,
    channels=1,
)


def test_crossformer_contract():
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    check_backbone(model, (32, 32), new_size=(64, 32), bad_size=(32, 48))
    model = ev.CrossFormer(**CROSSFORMER_RECT, key=jr.key(0))
    check_backbone(model, (64, 32), channels=1, new_size=(32, 64), bad_size=(64, 40))


@pytest.mark.parametrize("config, shape", [(CROSSFORMER, (3, 32, 32)),
                                           (CROSSFORMER_RECT, (1, 64, 32))])  # fmt: skip
def test_crossformer_intermediates_equal_vit_pytorch(config, shape):
    """Each stage's output map is vit-pytorch's (the output of `layers[i][1]`, the stage's
    transformer, or of its embedding for a stage without blocks). Measured: at most
    9.5e-7."""
    torch_model = reference("crossformer").CrossFormer(**config)
    perturb_(torch_model)
    torch_model.eval()
    model = ev.from_vit_pytorch(ev.CrossFormer(**config, key=jr.key(0)), torch_model.state_dict())
    x = torch.randn(1, *shape)
    expected = torch_outputs(torch_model, [f"layers.{i}.1" for i in range(4)], x)
    final, outputs = model.forward_intermediates(jnp.asarray(x[0].numpy()))
    for y, e in zip(outputs, expected, strict=True):
        assert rel_err(y, e[0]) <= 5e-6
    assert rel_err(final, expected[-1][0]) <= 5e-6
    tokens = model.forward_intermediates(
        jnp.asarray(x[0].numpy()), indices=[1], output_fmt="tokens", intermediates_only=True
    )
    np.testing.assert_array_equal(tokens[0], outputs[1].reshape(outputs[1].shape[0], -1).T)


def test_crossformer_headless_checkpoint_is_an_error():
    config = {**CROSSFORMER, "num_classes": 0}
    torch_model = reference("crossformer").CrossFormer(**{**config, "num_classes": 10})
    with pytest.raises(ev.CheckpointError, match="classifier"):
        ev.from_vit_pytorch(ev.CrossFormer(**config, key=jr.key(0)), torch_model.state_dict())


def test_crossformer_attention_maps():
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 32, 32))
    maps = eqx.filter_jit(image_attention)(model, x)
    names = [f"stages[{i}].{kind}" for i in range(4) for kind in ("short_attn", "long_attn")]
    assert [m.name for m in maps] == names
    depth, local, groups = CROSSFORMER["depth"], 2, CROSSFORMER["global_window_size"]
    for i in range(4):
        side, stride = 32 // 2 ** (i + 1), 2 ** (i + 1)
        for m, window, dilated in ((maps[2 * i], local, False), (maps[2 * i + 1], groups[i], True)):
            assert m.maps.shape == (depth[i], 1, side, side) and m.stride == (stride, stride)
            assert m.on_image((32, 32)).shape == (depth[i], 1, 32, 32)
            # each window's cells hold the mean over its queries of a softmax: they sum to one
            g = side // window
            if dilated:  # pixels g apart form a window
                cells = m.maps.reshape(depth[i], 1, window, g, window, g).sum(axis=(2, 4))
            else:
                cells = m.maps.reshape(depth[i], 1, g, window, g, window).sum(axis=(3, 5))
            np.testing.assert_allclose(cells, 1.0, rtol=1e-5)


def test_crossformer_uniform_attention():
    """Queries and keys of zero and a position bias of zero: every window attends
    uniformly, so each pixel receives `1 / window ** 2`."""
    model = ev.CrossFormer(**CROSSFORMER, key=jr.key(0))
    stages = []
    for stage in model.stages:
        assert stage is not None

        def parts(b: Any) -> list[Any]:
            return [
                leaf
                for a in (b.short_attn, b.long_attn)
                for leaf in (a.attn.to_qkv.weight, a.dpb.linears[-1].weight, a.dpb.linears[-1].bias)
            ]

        zeros = [jnp.zeros_like(p) for p in parts(stage.blocks)]
        stages.append(eqx.tree_at(lambda s: parts(s.blocks), stage, zeros))
    model = eqx.tree_at(lambda m: m.stages, model, tuple(stages))
    maps = image_attention(model, jr.normal(jr.key(1), (3, 32, 32)))
    for i in range(4):
        np.testing.assert_allclose(maps[2 * i].maps, 1 / 4, rtol=1e-6)
        window = CROSSFORMER["global_window_size"][i]
        np.testing.assert_allclose(maps[2 * i + 1].maps, 1 / window**2, rtol=1e-6)

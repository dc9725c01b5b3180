from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqx_vision as ev
from eqx_vision.layers import ConvBN
from eqx_vision.models.levit import pos_indices
from reference import batch_call, check_parity, count_params, reference, torch_param_count


TINY: dict[str, Any] = dict(
    image_size=32, num_classes=5, dim=(8, 12), depth=1, heads=1, mlp_mult=2, stages=2
)

CONFIGS: list[dict[str, Any]] = [
    # Two stages, 2x2 then 1x1 maps, distillation head, short dim_key / dim_value.
    dict(
        image_size=32,
        num_classes=10,
        dim=(16, 24),
        depth=2,
        heads=(2, 3),
        mlp_mult=2,
        stages=2,
        dim_key=8,
        dim_value=16,
        num_distill_classes=4,
    ),
    # Three stages on 3x3 → 2x2 → 1x1 maps (odd map halved with ceil), tuples padded
    # with their last value, dropout (off in inference).
    dict(
        image_size=48,
        num_classes=7,
        dim=(8, 16),
        depth=(1, 2),
        heads=2,
        mlp_mult=3,
        stages=3,
        dim_key=4,
        dim_value=8,
        dropout=0.1,
    ),
    # One stage (no downsampling block), a 4x4 map, one head.
    dict(
        image_size=64,
        num_classes=3,
        dim=12,
        depth=3,
        heads=1,
        mlp_mult=1,
        stages=1,
        dim_key=6,
        dim_value=10,
    ),
]


def make(config: dict[str, Any]) -> tuple[ev.LeViT, eqx.nn.State]:
    return eqx.nn.make_with_state(ev.LeViT)(**config, key=jax.random.key(0))


def both_heads(m: Any, x: Any, state: Any) -> Any:
    out, _ = batch_call(m, x, state)
    return jnp.concatenate(out, axis=-1) if isinstance(out, tuple) else out


def torch_both_heads(m: Any, x: Any) -> Any:
    out = m(x)
    return torch.cat(out, dim=-1) if isinstance(out, tuple) else out


# The largest errors against vit-pytorch, measured per configuration: outputs (relative to
# the largest), and the gradients of the input and of every parameter (each relative to its
# own largest), with the tolerances, 4-5x over them:
# outputs 3.5e-6, 2.2e-6, 2.1e-7; gradients 2.3e-5, 1.1e-4 (a key projection whose
# gradient is 30x smaller than the others), 1.1e-5.
TOLERANCES = [(2e-5, 1e-4), (1e-5, 5e-4), (1e-6, 5e-5)]


@pytest.mark.parametrize(
    "config, tol, grad_tol",
    [
        pytest.param(config, *tolerances, id=f"config{i}")
        for i, (config, tolerances) in enumerate(zip(CONFIGS, TOLERANCES, strict=True))
    ],
)
def test_parity(config, tol, grad_tol, exact_zero_gradients):
    torch.manual_seed(0)
    torch_model = reference("levit").LeViT(**config)
    model, state = make(config)
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    # The key BatchNorm's bias shifts every key of a head alike, which changes all scores of
    # a query alike: its exact gradient is zero, and both sides hold rounding noise there.
    stop = exact_zero_gradients(torch_model, r"\.to_k\.1\.bias$", r"\.to_k\.bn\.bias$")
    check_parity(
        model,
        torch_model,
        (3, size, size),
        state=state,
        call=lambda m, x, s: both_heads(stop(m), x, s),
        torch_call=torch_both_heads,
        tol=tol,
        grad_tol=grad_tol,
    )


def test_loaded_weights_are_copies():
    """Updating the torch tensors in place (as training does) leaves the loaded model as it is."""
    torch_model = reference("levit").LeViT(**TINY)
    model, state = make(TINY)
    model, state = ev.from_vit_pytorch(model, torch_model.state_dict(), state=state)
    index = model.downsamples[0].attn.to_q.bn.state_index
    before = [np.array(a) for a in (model.mlp_head.weight, *state.get(index))]
    with torch.no_grad():
        for tensor in torch_model.state_dict().values():
            tensor.add_(1)
    after = [np.array(a) for a in (model.mlp_head.weight, *state.get(index))]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_distillation_head_returns_a_pair():
    model, state = make(CONFIGS[0])
    x = jnp.ones((3, 32, 32))
    (logits, distill), _ = eqx.nn.inference_mode(model)(x, state)
    assert logits.shape == (10,) and distill.shape == (4,)
    model, state = make(TINY)
    logits, _ = eqx.nn.inference_mode(model)(x, state)
    assert isinstance(logits, jax.Array) and logits.shape == (5,)


def test_output_ignores_input_at_initialisation():
    """The reference quirk: zero-initialised output BatchNorms make the first downsampling
    block (no attention residual) output a constant in inference mode."""
    model, state = make(TINY)
    model = eqx.nn.inference_mode(model)
    a, state = model(jax.random.normal(jax.random.key(1), (3, 32, 32)), state)
    b, state = model(jax.random.normal(jax.random.key(2), (3, 32, 32)), state)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_attention_bias_indices():
    torch_model = reference("levit").LeViT(**CONFIGS[1])
    sd = torch_model.state_dict()
    for name, fmap, downsample in [
        ("backbone.0.layers.0.0.pos_indices", 3, False),
        ("backbone.1.layers.0.0.pos_indices", 3, True),
        ("backbone.2.layers.1.0.pos_indices", 2, False),
        ("backbone.3.layers.0.0.pos_indices", 2, True),
    ]:
        np.testing.assert_array_equal(pos_indices(fmap, downsample), sd[name].numpy())
    assert pos_indices(3, True).shape == (4, 9)


def test_blocks_are_stacked():
    model, state = make(CONFIGS[1])
    stage = model.stages[1]
    assert stage.depth == 2
    pos_bias, to_out = stage.blocks.attn.pos_bias, stage[0].attn.to_out
    assert pos_bias is not None and isinstance(to_out, ConvBN)
    assert pos_bias.shape == (2, 4, 2)
    running_mean, _, count = state.get(to_out.bn.state_index)
    assert running_mean.shape == (2, 16) and count.shape == (2,)


def test_checkpoint_errors():
    model, state = make(TINY)
    sd = dict(reference("levit").LeViT(**TINY).state_dict())
    key = "backbone.0.layers.0.0.pos_indices"
    with pytest.raises(ev.CheckpointError, match="pos_indices.*differs"):
        ev.from_vit_pytorch(model, dict(sd, **{key: sd[key].flip(0)}), state=state)
    with pytest.raises(ev.CheckpointError, match=r"pos_indices.*\(4, 4\).*\(2, 2\)"):
        ev.from_vit_pytorch(model, dict(sd, **{key: sd[key][:2, :2]}), state=state)
    with pytest.raises(ev.CheckpointError, match="missing.*distill_head"):
        ev.from_vit_pytorch(make(dict(TINY, num_distill_classes=3))[0], sd, state=state)
    with pytest.raises(ValueError, match="state=state"):
        ev.from_vit_pytorch(model, sd)
    model, state = ev.from_vit_pytorch(model, sd, state=state)
    assert int(state.get(model.downsamples[0].attn.to_q.bn.state_index)[2]) == 0


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(image_size=40), "image_size"),
        (dict(image_size=0), "image_size"),
        (dict(stages=0), "stages"),
        (dict(dim=(8, 12, 16)), "dim"),
        (dict(depth=0), "depth"),
        (dict(heads=(1, 0)), "heads"),
        (dict(mlp_mult=0), "mlp_mult"),
        (dict(dim_key=0), "dim_key"),
        (dict(dim_value=0), "dim_value"),
        (dict(num_classes=-1), "num_classes"),
        (dict(num_distill_classes=0), "num_distill_classes"),
        (dict(dropout=-0.5), "dropout"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        make({**TINY, **change})

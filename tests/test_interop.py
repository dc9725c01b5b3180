"""`from_vit_pytorch` is strict: every tensor used once, every leaf filled, shapes checked."""

from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest

import eqx_vision as ev
from reference import reference


CONFIG: dict[str, Any] = dict(
    image_size=16, patch_size=8, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=8
)


@pytest.fixture(scope="module")
def pair():
    torch_model = reference("vit").ViT(**CONFIG)
    return ev.ViT(**CONFIG, key=jax.random.key(0)), torch_model.state_dict()


def test_numpy_and_torch_inputs_load_the_same(pair):
    model, sd = pair
    from_torch = ev.from_vit_pytorch(model, sd)
    from_numpy = ev.from_vit_pytorch(model, {k: v.numpy() for k, v in sd.items()})
    assert eqx.tree_equal(from_torch, from_numpy)
    stacked = from_torch.transformer.layers.blocks.attn.to_qkv.weight
    np.testing.assert_array_equal(stacked[1], sd["transformer.layers.1.0.to_qkv.weight"].numpy())


def test_missing_key_is_named(pair):
    model, sd = pair
    sd = dict(sd)
    del sd["transformer.layers.1.1.net.4.bias"]
    with pytest.raises(
        ev.CheckpointError, match=r"missing key 'transformer\.layers\.1\.1\.net\.4\.bias'"
    ):
        ev.from_vit_pytorch(model, sd)


def test_unexpected_key_is_named(pair):
    model, sd = pair
    sd = dict(sd, **{"extra.weight": np.zeros((2, 3))})
    with pytest.raises(ev.CheckpointError, match=r"unexpected keys.*'extra\.weight' \(2, 3\)"):
        ev.from_vit_pytorch(model, sd)


def test_shape_mismatch_names_key_and_both_shapes(pair):
    model, sd = pair
    sd = dict(sd, pos_embedding=np.zeros((4, 16), np.float32))
    with pytest.raises(
        ev.CheckpointError,
        match=r"'pos_embedding'.*model expects \(5, 16\).*state dict has \(4, 16\)",
    ):
        ev.from_vit_pytorch(model, sd)


def test_failed_load_leaves_the_model_untouched(pair):
    model, sd = pair
    before = jax.tree.map(np.array, eqx.filter(model, eqx.is_array))
    sd = dict(sd)
    del sd["mlp_head.bias"]
    with pytest.raises(ev.CheckpointError):
        ev.from_vit_pytorch(model, sd)
    assert eqx.tree_equal(eqx.filter(model, eqx.is_array), before)


def test_wrong_architecture_and_wrong_type():
    model = ev.ViT(**CONFIG, key=jax.random.key(0))
    with pytest.raises(TypeError, match="(?i)mapping"):
        ev.from_vit_pytorch(model, [1, 2])  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="no vit-pytorch converter for Linear"):
        ev.from_vit_pytorch(ev.layers.Linear(2, 2, key=jax.random.key(0)), {})
    other = reference("vit").ViT(**dict(CONFIG, depth=3)).state_dict()
    with pytest.raises(ev.CheckpointError, match="unexpected keys.*transformer.layers.2"):
        ev.from_vit_pytorch(model, other)


def test_the_table_covers_every_model_with_a_reference_counterpart():
    """Every public model class of eqx_vision (the 17 architectures and the PatchMerger, SPT
    and LSA modules, which vit-pytorch defines as modules of their own) has a converter,
    found through the explicit table of `eqx_vision.interop.vit_pytorch`; the classes of
    timm's different architectures under the same names (`Timm*`) have none."""
    from eqx_vision.interop.vit_pytorch import CONVERTERS

    public = {
        getattr(ev, name)
        for name in dir(ev.models)
        if isinstance(getattr(ev.models, name), type)
        and issubclass(getattr(ev.models, name), eqx.Module)
        and not name.startswith("Timm")
    }
    assert len(public) == 20
    assert public == set(CONVERTERS)
    for cls in public:
        assert getattr(ev, cls.__name__) is cls


def test_an_unsupported_module_names_the_supported_ones():
    from eqx_vision.interop.vit_pytorch import CONVERTERS

    module = ev.layers.MapFeedForward(4, 8, key=jax.random.key(0))
    with pytest.raises(TypeError) as error:
        ev.from_vit_pytorch(module, {})
    message = str(error.value)
    assert "no vit-pytorch converter for MapFeedForward" in message
    for cls in CONVERTERS:
        assert cls.__name__ in message


def test_a_stateless_model_built_with_its_state_loads_with_it(pair):
    """`eqx.nn.make_with_state` serves every model: a stateless one's empty state is taken
    and returned as given."""
    _, sd = pair
    model, state = eqx.nn.make_with_state(ev.ViT)(**CONFIG, key=jax.random.key(0))
    loaded, same = ev.from_vit_pytorch(model, sd, state=state)
    assert same is state
    assert eqx.tree_equal(loaded, ev.from_vit_pytorch(model, sd))
    with pytest.raises(TypeError, match=r"state must be the eqx\.nn\.State.*got dict"):
        ev.from_vit_pytorch(model, sd, state={})


def test_a_model_with_batchnorm_needs_its_state():
    config = dict(image_size=32, num_classes=5, dim=(8, 12), depth=1, heads=1, mlp_mult=2,
                  stages=2)  # fmt: skip
    model, _ = eqx.nn.make_with_state(ev.LeViT)(**config, key=jax.random.key(0))
    sd = reference("levit").LeViT(**config).state_dict()
    with pytest.raises(ValueError, match=r"LeViT keeps BatchNorm statistics.*state=state"):
        ev.from_vit_pytorch(model, sd)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_tensors_are_not_cast_to_float(pair, dtype):
    model, sd = pair
    sd = {k: v.numpy() for k, v in sd.items()}
    sd["mlp_head.bias"] = sd["mlp_head.bias"].astype(dtype)
    with pytest.raises(
        ev.CheckpointError,
        match=rf"dtype mismatch for 'mlp_head\.bias': the model expects float32, the state "
        rf"dict has {np.dtype(dtype)}",
    ):
        ev.from_vit_pytorch(model, sd)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_floating_tensors_of_another_precision_are_converted(pair, dtype):
    model, sd = pair
    sd = {k: v.numpy() for k, v in sd.items()}
    sd["mlp_head.bias"] = sd["mlp_head.bias"].astype(dtype)
    loaded = ev.from_vit_pytorch(model, sd)
    assert loaded.mlp_head.bias.dtype == np.float32
    np.testing.assert_array_equal(loaded.mlp_head.bias, sd["mlp_head.bias"].astype(np.float32))

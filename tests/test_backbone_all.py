"""The backbone API and the inspection tools on every public model (its tiny preset): the
contract of `tests/backbone.py`, attention maps in image coordinates, gradient saliency."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
from backbone import check_backbone
from eqx_vision.inspect import AttentionMap, image_attention, saliency
from eqx_vision.training import is_stateful
from tiny import NAMES, NUM_CLASSES, build, config, input_shape


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    # PiT's default patch stride (half the patch) gives overlapping patches and a grid one
    # short of the nominal reduction; with the stride equal to the patch size it is exact.
    overrides = {"stride": config(name).kwargs["patch_size"]} if name == "PiT" else {}
    model, state = build(name, jax.random.key(0), **overrides)
    channels, h, w = input_shape(name)
    check_backbone(model, (h, w), state=state if is_stateful(model) else None, channels=channels)


@pytest.mark.parametrize("name", NAMES)
def test_attention_maps_cover_the_image(name):
    """Every model has attention maps: finite, on grids that cover the image (every cell
    starts inside it; a border no patch reaches, at most a stride and a kernel's overhang,
    is left), mapped onto the image, the same under `jit`."""
    model, state = build(name, jax.random.key(0))
    channels, h, w = input_shape(name)
    image = jax.random.normal(jax.random.key(1), (channels, h, w))
    args = (state,) if is_stateful(model) else ()
    groups = image_attention(model, image, *args)
    assert groups and all(isinstance(g, AttentionMap) for g in groups)
    jitted = eqx.filter_jit(image_attention)(model, image, *args)
    for group, again in zip(groups, jitted, strict=True):
        layers, heads, gh, gw = group.maps.shape
        assert layers >= 1 and heads >= 1, group.name
        sh, sw = group.stride
        assert (gh - 1) * sh < h <= (gh + 1) * sh + 8, (group.name, gh, sh)
        assert (gw - 1) * sw < w <= (gw + 1) * sw + 8, (group.name, gw, sw)
        assert np.isfinite(np.asarray(group.maps)).all(), group.name
        assert group.on_image((h, w)).shape == (layers, heads, h, w)
        np.testing.assert_allclose(group.maps, again.maps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ViT", "CvT"])
def test_saliency_is_the_gradient_of_the_label_logit(name):
    model, state = build(name, jax.random.key(0))
    model = eqx.nn.inference_mode(model)
    stateful = is_stateful(model)
    channels, h, w = input_shape(name)
    images = jax.random.normal(jax.random.key(2), (2, channels, h, w))
    labels = jnp.array([1, NUM_CLASSES - 1])
    out = saliency(model, images, labels, state if stateful else None)
    assert out.shape == (2, h, w) and bool((out >= 0).all())

    def logit(x, label):
        return (model(x, state)[0] if stateful else model(x))[label]

    grad = jax.grad(logit)(images[1], labels[1])
    np.testing.assert_allclose(out[1], jnp.abs(grad).max(axis=0), rtol=1e-5, atol=1e-7)
    predicted = saliency(model, images, state=state if stateful else None)
    assert predicted.shape == (2, h, w)


def test_functions_reject_bad_arguments():
    model, _ = build("ViT", jax.random.key(0))
    with pytest.raises(ValueError, match="image_size"):
        ev.set_image_size(model, (0, 32))
    with pytest.raises(ValueError, match="num_classes"):
        ev.reset_head(model, -1)
    with pytest.raises(TypeError, match="set_image_size"):
        ev.set_image_size(object(), 32)
    with pytest.raises(TypeError, match="no attention maps"):
        image_attention(object(), jnp.zeros((3, 8, 8)))

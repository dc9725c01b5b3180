from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float, PRNGKeyArray

import eqx_vision as ev
from reference import check_parity, count_params, reference, torch_param_count


CONFIGS: list[dict[str, Any]] = [
    dict(
        image_size=32,
        num_classes=10,
        dim=16,
        depth=2,
        heads=2,
        mlp_dim=24,
        dim_head=8,
        t2t_layers=((3, 2), (3, 2)),
    ),
    # Three stages with an even kernel and a stride-1 stage (no padding); mean pooling; the
    # main transformer has heads == 1 and dim_head == dim, so no output projection either.
    dict(
        image_size=24,
        num_classes=5,
        dim=8,
        depth=1,
        heads=1,
        mlp_dim=16,
        dim_head=8,
        channels=1,
        pool="mean",
        t2t_layers=((4, 2), (2, 1), (3, 2)),
    ),
    # The default tokens-to-token stages ((7, 4), (3, 2), (3, 2)) on one channel.
    dict(
        image_size=32,
        num_classes=7,
        dim=12,
        depth=3,
        heads=4,
        mlp_dim=20,
        dim_head=4,
        channels=1,
        dropout=0.1,
        emb_dropout=0.1,
    ),
    # A single stage: no tokens-to-token transformer at all.
    dict(
        image_size=16,
        num_classes=3,
        dim=8,
        depth=2,
        heads=2,
        mlp_dim=8,
        dim_head=4,
        channels=2,
        t2t_layers=((4, 4),),
    ),
]

SMALL: dict[str, Any] = dict(
    image_size=16,
    num_classes=3,
    dim=8,
    depth=1,
    heads=2,
    mlp_dim=8,
    dim_head=4,
    t2t_layers=((3, 2), (3, 2)),
)


# The largest errors of the parity tests below against vit-pytorch, measured (float32, this
# suite's CPU): outputs (relative to the largest output) and gradients (of the input and of
# every parameter, each relative to its own largest), per configuration, with tolerances
# 5-7x over them. The default tokens-to-token stages (configuration 2) run transformers of
# width 49 and 441 on the unfolded pixels, and differ more: outputs 1.9e-6, gradients
# 7.5e-5 (the other configurations and the custom transformer: 4.3e-7 and 2.1e-6).
TOL, GRAD_TOL = 3e-6, 1e-5
TOLERANCES = [(TOL, GRAD_TOL), (TOL, GRAD_TOL), (1e-5, 4e-4), (TOL, GRAD_TOL)]


@pytest.mark.parametrize(
    "config, tol, grad_tol",
    [
        pytest.param(config, *tolerances, id=f"config{i}")
        for i, (config, tolerances) in enumerate(zip(CONFIGS, TOLERANCES, strict=True))
    ],
)
def test_parity(config, tol, grad_tol):
    torch_model = reference("t2t").T2TViT(**config)
    model = ev.T2TViT(**config, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    size = config["image_size"]
    shape = (config.get("channels", 3), size, size)
    check_parity(model, torch_model, shape, tol=tol, grad_tol=grad_tol)


def test_parity_custom_transformer():
    """`transformer=`: the reference's vit.py Transformer against ours, depth/heads unset."""
    config: dict[str, Any] = dict(image_size=16, num_classes=4, dim=12, t2t_layers=((3, 2), (3, 2)))
    torch_transformer = reference("vit").Transformer(12, 2, 3, 4, 16)
    torch_model = reference("t2t").T2TViT(**config, transformer=torch_transformer)
    transformer = ev.layers.Transformer(12, 2, 3, 4, 16, key=jax.random.key(1))
    model = ev.T2TViT(**config, transformer=transformer, key=jax.random.key(0))
    assert count_params(model) == torch_param_count(torch_model)
    check_parity(model, torch_model, (3, 16, 16), tol=TOL, grad_tol=GRAD_TOL)


class _Scale(eqx.Module):
    weight: Float[Array, " dim"]

    def __call__(
        self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim"]:
        return x * self.weight


class _Truncate(eqx.Module):
    def __call__(
        self, x: Float[Array, "seq dim"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq dim2"]:
        return x[:, :2]


def test_custom_transformer_module():
    config = {k: v for k, v in SMALL.items() if k not in ("depth", "heads", "mlp_dim")}
    model = ev.T2TViT(**config, transformer=_Scale(jnp.full((8,), 2.0)), key=jax.random.key(0))
    out = model(jax.random.normal(jax.random.key(1), (3, 16, 16)))
    assert out.shape == (3,)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones((3, 16, 16)))))(model)
    assert isinstance(grads.transformer, _Scale)
    assert bool(jnp.any(grads.transformer.weight != 0))
    torch_model = reference("t2t").T2TViT(**SMALL)
    with pytest.raises(ev.CheckpointError, match="_Scale"):
        ev.from_vit_pytorch(model, torch_model.state_dict())


def test_custom_transformer_wrong_shape():
    with pytest.raises(ValueError, match="transformer"):
        ev.T2TViT(**SMALL, transformer=_Truncate(), key=jax.random.key(0))


def test_structure():
    model = ev.T2TViT(**CONFIGS[2], key=jax.random.key(0))
    assert model.grid_sizes == (8, 4, 2)
    assert model.pos_embedding.shape == (2 * 2 + 1, 12)
    assert model.to_patch_embedding.weight.shape == (12, 1 * 49 * 9 * 9)
    dims = []
    for t in model.t2t_transformers:
        attn = t.layers.blocks.attn
        assert isinstance(attn, ev.layers.Attention)
        assert attn.to_out is None and attn.heads == 1 and t.norm is not None
        assert attn.scale == pytest.approx(attn.dim_head**-0.5)
        dims.append(attn.dim_head)
    assert dims == [49, 441]


def test_vmap_matches_single():
    model = eqx.nn.inference_mode(ev.T2TViT(**SMALL, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16, 16))
    batched = jax.vmap(model)(x)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(model(x[1])), atol=1e-6)


def test_tokens_grid_round_trip():
    grid = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    tokens = ev.layers.grid_to_tokens(grid)
    assert tokens.shape == (12, 2)
    np.testing.assert_array_equal(np.asarray(tokens[5]), np.asarray(grid[:, 1, 1]))
    np.testing.assert_array_equal(np.asarray(ev.layers.tokens_to_grid(tokens, 3)), grid)
    square = ev.layers.tokens_to_grid(jnp.ones((9, 2)))
    assert square.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="square"):
        ev.layers.tokens_to_grid(tokens)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(image_size=0), "image_size"),
        (dict(num_classes=-1), "num_classes"),
        (dict(dim=0), "dim"),
        (dict(depth=None), "depth"),
        (dict(heads=None, mlp_dim=None), "heads, mlp_dim"),
        (dict(depth=0), "depth"),
        (dict(dim_head=0), "dim_head"),
        (dict(channels=0), "channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(emb_dropout=-0.1), "emb_dropout"),
        (dict(t2t_layers=()), "t2t_layers"),
        (dict(t2t_layers=((3, 0),)), "t2t_layers"),
        (dict(t2t_layers=((7, 4), (7, 1))), "t2t_layers"),
    ],
)
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        ev.T2TViT(**{**SMALL, **change}, key=jax.random.key(0))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(image_size=(16, 16)), "image_size"),
        (dict(pool="max"), "pool"),
        (dict(t2t_layers=((3, 2, 1),)), "t2t_layers"),
        (dict(transformer="encoder"), "transformer"),
    ],
)
def test_config_type_errors(no_typecheck, change, name):
    with pytest.raises(ValueError, match=name):
        ev.T2TViT(**{**SMALL, **change}, key=jax.random.key(0))

"""The shared layers against their torch counterparts, and their own contracts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import eqx_vision as ev
from eqx_vision.layers import (
    AbstractClassTokenViT,
    Attention,
    BatchNorm,
    ChannelLayerNorm,
    Conv2d,
    DepthwiseConv2d,
    FeedForward,
    LayerDrop,
    LayerNorm,
    Linear,
    PatchEmbedding,
    Stack,
    Transformer,
    gelu,
    max_pool2d,
    pool_tokens,
    sincos_2d,
    unfold,
    with_class_tokens,
)
from reference import rel_err


def _set(module, **arrays):
    names = list(arrays)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names],
        module,
        [jnp.asarray(arrays[n].detach().numpy()) for n in names],
    )


CONV_CASES = [  # channels, kernel, stride, padding, multiplier, height, width
    (8, 3, 1, 1, 1, 9, 9),
    (8, 3, 2, 1, 2, 10, 7),
    (4, 7, 7, 0, 1, 14, 21),
    (6, 3, 2, 1, 1, 8, 8),
    (3, 5, 1, 2, 3, 6, 11),
    (4, 1, 2, 0, 1, 9, 9),
    (3, 8, 4, 2, 1, 20, 20),
]


@pytest.mark.parametrize("c,k,s,p,m,h,w", CONV_CASES)
def test_depthwise_conv_matches_torch(c, k, s, p, m, h, w):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(c, c * m, k, s, p, groups=c)
    layer = DepthwiseConv2d(c, k, stride=s, padding=p, multiplier=m, key=jax.random.key(0))
    layer = _set(layer, weight=ref.weight, bias=ref.bias)
    x = torch.randn(2, c, h, w)
    assert rel_err(jax.vmap(layer)(jnp.asarray(x.numpy())), ref(x).detach().numpy()) < 1e-6


@pytest.mark.parametrize("c,k,s,p,m,h,w", CONV_CASES)
def test_conv_unfold_pool_match_torch(c, k, s, p, m, h, w):
    torch.manual_seed(1)
    ref = torch.nn.Conv2d(c, 5, k, s, p)
    layer = _set(
        Conv2d(c, 5, k, stride=s, padding=p, key=jax.random.key(0)),
        weight=ref.weight,
        bias=ref.bias,
    )
    x = torch.randn(2, c, h, w)
    xj = jnp.asarray(x.numpy())
    assert rel_err(jax.vmap(layer)(xj), ref(x).detach().numpy()) < 1e-6
    expected = torch.nn.Unfold(k, stride=s, padding=p)(x).transpose(1, 2).numpy()
    assert rel_err(jax.vmap(lambda a: unfold(a, k, s, p))(xj), expected) == 0
    expected = torch.nn.MaxPool2d(3, 2, 1)(x).numpy()
    assert rel_err(jax.vmap(lambda a: max_pool2d(a, 3, 2, 1))(xj), expected) == 0


def test_norms_and_linear_match_torch():
    torch.manual_seed(2)
    x = torch.randn(4, 6, 5, 3)
    ln = torch.nn.LayerNorm(3)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ours = _set(LayerNorm(3), weight=ln.weight, bias=ln.bias)
    assert rel_err(ours(jnp.asarray(x.numpy())), ln(x).detach().numpy()) < 1e-6
    chan = _set(ChannelLayerNorm(6), weight=ln.weight.repeat(2), bias=ln.bias.repeat(2))
    xc = x.numpy()
    mean = xc.mean(1, keepdims=True)
    var = xc.var(1, keepdims=True)
    g = ln.weight.repeat(2).detach().numpy()[None, :, None, None]
    b = ln.bias.repeat(2).detach().numpy()[None, :, None, None]
    expected = (xc - mean) / np.sqrt(var + 1e-5) * g + b
    assert rel_err(jax.vmap(chan)(jnp.asarray(xc)), expected) < 1e-6
    lin = torch.nn.Linear(3, 7)
    ours = _set(Linear(3, 7, key=jax.random.key(0)), weight=lin.weight, bias=lin.bias)
    assert rel_err(ours(jnp.asarray(x.numpy())), lin(x).detach().numpy()) < 1e-6


# One row per scale of the normalised features: where the variance is far below eps (1e-5),
# eps sets the output (a LayerNorm with eps 1e-6 gives outputs 2.3x too large on the first
# row); where it is far above, eps is invisible.
NORM_SCALES = (1e-3, 3e-3, 1e-2, 1.0, 30.0)
# The largest error against the reference over these rows, measured: 1.0e-7 (LayerNorm) and
# 2.1e-7 (ChannelLayerNorm), relative to each row's largest output; the tolerance is 5x over
# them (eps 1e-6 instead of 1e-5 is off by 0.23 on the first row).
NORM_TOL = 1e-6


def _rows_at_scales(dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    scales = torch.tensor(NORM_SCALES)[:, None]
    return scales * torch.randn(len(NORM_SCALES), dim, generator=gen) + 0.5 * scales


def _row_errors(actual, expected) -> list[float]:
    return [rel_err(a, e) for a, e in zip(np.asarray(actual), np.asarray(expected), strict=True)]


def test_layer_norm_matches_torch_where_eps_matters():
    """`LayerNorm` against `torch.nn.LayerNorm` (eps 1e-5) on features of standard deviation
    1e-3 to 30, with a random affine map; and its default eps is torch's."""
    torch.manual_seed(5)
    ref = torch.nn.LayerNorm(16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = _set(LayerNorm(16), weight=ref.weight, bias=ref.bias)
    assert ours.eps == ref.eps == 1e-5
    x = _rows_at_scales(16)
    errors = _row_errors(ours(jnp.asarray(x.numpy())), ref(x).detach().numpy())
    assert max(errors) <= NORM_TOL, dict(zip(NORM_SCALES, errors, strict=True))


def test_channel_layer_norm_matches_the_reference_where_eps_matters():
    """`ChannelLayerNorm` against the channel LayerNorm of vit-pytorch's CvT (eps 1e-5, the
    one CvT, NesT, Twins, CrossFormer, ScalableViT and RegionViT share), at every pixel
    of maps whose channels have standard deviation 1e-3 to 30."""
    from reference import reference

    torch.manual_seed(6)
    ref = reference("cvt").LayerNorm(8)
    with torch.no_grad():
        ref.g.normal_()
        ref.b.normal_()
    ours = _set(ChannelLayerNorm(8), weight=ref.g.reshape(-1), bias=ref.b.reshape(-1))
    assert ours.eps == ref.eps == 1e-5
    # (rows, channels) -> (rows, channels, 2, 3): the same channel values at every pixel,
    # plus a little noise so that the pixels differ.
    base = _rows_at_scales(8)[:, :, None, None]
    gen = torch.Generator().manual_seed(7)
    x = base * (1 + 0.1 * torch.randn(len(NORM_SCALES), 8, 2, 3, generator=gen))
    out = jax.vmap(ours)(jnp.asarray(x.numpy()))
    errors = _row_errors(out, ref(x).detach().numpy())
    assert max(errors) <= NORM_TOL, dict(zip(NORM_SCALES, errors, strict=True))


def test_feedforward_matches_torch():
    """`FeedForward` (LayerNorm, Linear, exact GELU, Linear) against vit-pytorch's, with
    hidden pre-activations spread beyond [-4, 4]. Measured error 2.9e-7 relative to the
    largest output; the tolerance is 7x over it (the tanh form of GELU is off by 1.4e-4)."""
    from reference import reference

    torch.manual_seed(8)
    ref = reference("vit").FeedForward(12, 24)
    norm, fc1, _, _, fc2, _ = ref.net
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        fc1.weight.mul_(4.0)
    ours = FeedForward(12, 24, key=jax.random.key(0))
    ours = eqx.tree_at(
        lambda f: (f.norm.weight, f.norm.bias, f.fc1.weight, f.fc1.bias, f.fc2.weight, f.fc2.bias),
        ours,
        tuple(jnp.asarray(t.detach().numpy()) for t in
              (norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)),
    )  # fmt: skip
    x = torch.randn(40, 12)
    hidden = fc1(norm(x)).detach().numpy()
    assert hidden.min() < -4 and hidden.max() > 4, (hidden.min(), hidden.max())
    assert rel_err(ours(jnp.asarray(x.numpy())), ref(x).detach().numpy()) <= 2e-6


def test_gelu_and_its_derivatives_match_torch():
    x = torch.linspace(-12.0, 12.0, 2001).requires_grad_()
    y = torch.nn.functional.gelu(x)
    (slope,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), x)
    xj = jnp.asarray(x.detach().numpy())
    value = gelu(xj)
    ours_slope = jax.vmap(jax.grad(gelu))(xj)
    ours_curvature = jax.vmap(jax.grad(jax.grad(gelu)))(xj)
    assert value.dtype == jnp.float32
    for ours, ref in [(value, y), (ours_slope, slope), (ours_curvature, curvature)]:
        np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    # bfloat16 in, bfloat16 out, evaluated in float32 and rounded once.
    low = xj.astype(jnp.bfloat16)
    assert gelu(low).dtype == jnp.bfloat16
    np.testing.assert_array_equal(gelu(low), gelu(low.astype(jnp.float32)).astype(jnp.bfloat16))


def test_batchnorm_matches_torch_train_and_eval():
    torch.manual_seed(3)
    ref = torch.nn.BatchNorm2d(6)
    bn, state = eqx.nn.make_with_state(BatchNorm)(6)
    step = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for _ in range(4):
        x = torch.randn(3, 6, 5, 4) * 2 + 1
        expected = ref(x).detach().numpy()
        out, state = step(jnp.asarray(x.numpy()), state)
        assert rel_err(out, expected) < 1e-5
    mean, var, count = state.get(bn.state_index)
    assert ref.running_mean is not None and ref.running_var is not None
    assert ref.num_batches_tracked is not None
    assert rel_err(mean, ref.running_mean.numpy()) < 1e-5
    assert rel_err(var, ref.running_var.numpy()) < 1e-5
    assert int(count) == int(ref.num_batches_tracked) == 4
    ref.eval()
    x = torch.randn(2, 6, 3, 3)
    infer = eqx.nn.inference_mode(bn)
    out, new_state = jax.vmap(infer, in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(x.numpy()), state
    )
    assert rel_err(out, ref(x).detach().numpy()) < 1e-5
    assert eqx.tree_equal(new_state.get(bn.state_index), state.get(bn.state_index))


def test_batchnorm_without_axis_name_says_how_to_fix():
    bn, state = eqx.nn.make_with_state(BatchNorm)(2)
    with pytest.raises(NameError, match="axis_name"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.ones((2, 2, 3, 3)), state)


class _Affine(eqx.Module):
    linear: Linear

    def __init__(self, index, *, key):
        self.linear = Linear(4, 4, key=key)

    def __call__(self, x, *, key=None):
        return jnp.tanh(self.linear(x))


def test_stack_scan_equals_a_loop_over_its_blocks():
    stack = Stack(_Affine, 3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = x
    for i in range(len(stack)):
        y = stack[i](y)
    assert rel_err(stack(x), y) < 1e-6
    assert not eqx.tree_equal(stack[0], stack[1])  # every block has its own key
    with pytest.raises(IndexError):
        stack[3]


def _binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """The range of a Binomial(n, p) count within `sigmas` standard deviations of its mean."""
    sd = (n * p * (1 - p)) ** 0.5
    return n * p - sigmas * sd, n * p + sigmas * sd


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_layer_drop_skips_each_layer_with_probability_p(p):
    """The masks of 1000 keys x 8 layers: each layer is dropped with probability `p`, in
    total and at every position (within 5 binomial standard deviations: for p = 0.1 the
    total 800 +- 67, where a rate of 1 - p would drop 7200); never all of them."""
    depth, draws = 8, 1000
    keys = jax.random.split(jax.random.key(0), draws)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: LayerDrop(p)(depth, key=k)))(keys))
    assert masks.shape == (draws, depth) and masks.dtype == bool
    low, high = _binomial_bounds(draws * depth, p)
    assert low <= masks.sum() <= high, (masks.sum(), low, high)
    low, high = _binomial_bounds(draws, p)
    per_layer = masks.sum(axis=0)
    assert np.all((low <= per_layer) & (per_layer <= high)), (per_layer, low, high)
    assert not masks.all(axis=1).any()


def test_layer_drop_keeps_one_layer_when_it_draws_all():
    """At p = 0.9 over 2 layers, both are drawn for dropping with probability 0.81; one of
    the two, chosen uniformly, is then kept: each layer is skipped with probability
    0.09 + 0.81 / 2 = 0.495 and exactly one is skipped with probability 0.99."""
    keys = jax.random.split(jax.random.key(1), 2000)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: LayerDrop(0.9)(2, key=k)))(keys))
    assert not masks.all(axis=1).any()
    low, high = _binomial_bounds(2000, 0.495)
    assert np.all((low <= masks.sum(axis=0)) & (masks.sum(axis=0) <= high)), masks.sum(axis=0)
    low, high = _binomial_bounds(2000, 0.99)
    assert low <= (masks.sum(axis=1) == 1).sum() <= high


class _Marker(eqx.Module):
    """Block `index` of a stack adds 1 at position `index`: the output shows which ran."""

    onehot: jax.Array

    def __init__(self, index, depth, *, key):
        self.onehot = jnp.zeros(depth).at[index].set(1.0)

    def __call__(self, x, *, key=None):
        return x + self.onehot


def test_stack_layer_dropout_skips_blocks_with_probability_p():
    """A `Stack` with `layer_dropout=0.2` skips each block with probability 0.2 in training
    (the blocks that ran, read off the output, over 1000 keys) and none in inference."""
    depth, p, draws = 6, 0.2, 1000
    stack = Stack(lambda i, key: _Marker(i, depth, key=key), depth, layer_dropout=p,
                  key=jax.random.key(0))  # fmt: skip
    keys = jax.random.split(jax.random.key(2), draws)
    ran = np.asarray(eqx.filter_jit(jax.vmap(lambda k: stack(jnp.zeros(depth), key=k)))(keys))
    assert set(np.unique(ran)) <= {0.0, 1.0}
    low, high = _binomial_bounds(draws * depth, p)
    assert low <= (ran == 0).sum() <= high, ((ran == 0).sum(), low, high)
    infer = eqx.nn.inference_mode(stack)
    np.testing.assert_array_equal(infer(jnp.zeros(depth), key=keys[0]), np.ones(depth))


def test_stacked_stateful_blocks_get_stacked_state():
    """Blocks with BatchNorm, stacked: one `StateIndex` per position, holding the stacked
    initial values; restacking the blocks keeps the indices the state was made for."""
    norms = [BatchNorm(4, axis_name="batch") for _ in range(3)]
    stacked = ev.layers.stack_modules(norms)
    indices = [n for n in jax.tree.leaves(stacked, is_leaf=ev.layers.is_state_index)
               if ev.layers.is_state_index(n)]  # fmt: skip
    firsts = [n for n in jax.tree.leaves(norms[0], is_leaf=ev.layers.is_state_index)
              if ev.layers.is_state_index(n)]  # fmt: skip
    assert len(indices) == len(firsts) > 0
    for index, first in zip(indices, firsts, strict=True):
        for new, old in zip(jax.tree.leaves(index.init), jax.tree.leaves(first.init), strict=True):
            assert new.shape == (3, *old.shape)
    state = eqx.nn.State(stacked)
    assert jax.tree.leaves(state.get(indices[0]))[0].shape[0] == 3
    blocks = [eqx.combine(jax.tree.map(lambda a, i=i: a[i], eqx.filter(stacked, eqx.is_array)),
                          stacked) for i in range(3)]  # fmt: skip
    restacked = ev.layers.stack_modules(blocks)  # e.g. after converting each block
    assert jax.tree.structure(state.substate(restacked)) == jax.tree.structure(
        state.substate(stacked)
    )
    assert ev.layers.is_stateful(stacked) and not ev.layers.is_stateful(norms[0].weight)


def test_pair_and_its_config_error():
    from eqx_vision import presets

    assert ev.layers.pair(3, "size") == (3, 3) and ev.layers.pair((2, 5), "size") == (2, 5)
    for bad in ("3", (1, 2, 3), (1.0, 2), True):
        with pytest.raises(ValueError, match="size must be an int or a pair of ints"):
            ev.layers.pair(bad, "size")
    with pytest.raises(ValueError, match="size must be positive"):
        ev.layers.pair((0, 2), "size")
    with pytest.raises(presets.ConfigError, match=r"ints; got 'x'$"):
        presets._pair("x", "--image-size")


def test_sincos_matches_reference():
    from reference import reference

    expected = reference("simple_vit").posemb_sincos_2d(h=3, w=5, dim=16).numpy()
    assert rel_err(sincos_2d(3, 5, 16), expected) < 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 10)


@settings(max_examples=15, deadline=None)
@given(
    heads=st.integers(1, 4),
    dim_head=st.integers(1, 8),
    seq=st.integers(1, 6),
    ctx=st.integers(0, 4),
    variant=st.sampled_from(["plain", "talking_heads", "reattention", "locality"]),
)
def test_attention_shapes(heads, dim_head, seq, ctx, variant):
    dim = 8
    options = {} if variant == "plain" else {variant: True}
    attn = Attention(
        dim, heads=heads, dim_head=dim_head, fused_qkv=ctx == 0, key=jax.random.key(0), **options
    )
    x = jax.random.normal(jax.random.key(1), (seq, dim))
    context = jax.random.normal(jax.random.key(2), (ctx, dim)) if ctx else None
    out = attn(x, context)
    assert out.shape == (seq, dim)
    assert bool(jnp.all(jnp.isfinite(out))) or (variant == "locality" and seq == 1 and ctx == 0)


@settings(max_examples=6, deadline=None)
@given(
    heads=st.integers(1, 3),
    n=st.integers(2, 23),
    m=st.integers(1, 9),
    max_scores=st.integers(1, 40),
    with_bias=st.booleans(),
)
@example(heads=2, n=7, m=3, max_scores=10, with_bias=True)  # 3 chunks of 2, then 1 query
def test_attend_in_chunks_equals_attend_at_once(heads, n, m, max_scores, with_bias):
    """Long sequences are attended in chunks of queries (the last one shorter when the
    chunks do not divide them): the same values and gradients as all at once."""
    from eqx_vision.layers import _attention

    q, k, v, bias = (
        jax.random.normal(jax.random.key(i), shape)
        for i, shape in enumerate([(heads, n, 4), (heads, m, 4), (heads, m, 3), (heads, n, m)])
    )
    bias = bias if with_bias else None

    def loss(fn, q, k, v):
        out = fn(q, k, v, scale=0.5, bias=bias, dropout=None, key=None)
        return jnp.sum(jnp.sin(out)), out

    grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
    saved = _attention.MAX_SCORES
    try:
        _attention.MAX_SCORES = max_scores
        program = str(jax.make_jaxpr(lambda *a: grad(_attention.attend, *a))(q, k, v))
        chunked, out = jax.jit(lambda *a: grad(_attention.attend, *a))(q, k, v)
    finally:
        _attention.MAX_SCORES = saved
    assert ("remat" in program) == (heads * n * m > max_scores), program
    whole, expected = jax.jit(lambda *a: grad(_attention._attend, *a))(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "talking_heads", "reattention", "locality"])
@pytest.mark.parametrize("with_context", [False, True])
def test_attention_in_chunks_equals_attention_at_once(monkeypatch, variant, with_context):
    """`Attention` takes long sequences in chunks of queries too, with each variant (the
    locality mask offset by the chunk's first query) and a context: the same values and
    gradients. 3 heads x 7 queries x m keys with at most 3 * 7 * m // 4 + 1 scores: three
    chunks of 2 queries, then the last one alone."""
    from eqx_vision.layers import _attention

    dim, options = 8, ({} if variant == "plain" else {variant: True})
    attn = Attention(dim, heads=3, dim_head=4, fused_qkv=not with_context,
                     key=jax.random.key(0), **options)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (7, dim))
    context = jax.random.normal(jax.random.key(2), (3, dim)) if with_context else None
    m = 10 if with_context else 7
    bias = jax.random.normal(jax.random.key(3), (3, 7, m))

    def loss(attn, x):
        out = attn(x, context, bias=bias)
        return jnp.sum(jnp.sin(out)), out

    grad = eqx.filter_grad(loss, has_aux=True)
    whole, expected = eqx.filter_jit(grad)(attn, x)
    assert "remat" not in str(eqx.filter_make_jaxpr(grad)(attn, x)[0])
    monkeypatch.setattr(_attention, "MAX_SCORES", 3 * 7 * m // 4 + 1)  # traced anew below
    assert "remat" in str(eqx.filter_make_jaxpr(grad)(attn, x)[0])
    chunked, out = eqx.filter_jit(lambda a, x: grad(a, x))(attn, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    leaves = lambda tree: jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    assert leaves(chunked)
    for a, b in zip(leaves(chunked), leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attend_in_chunks_keeps_dropout_random_and_reproducible(monkeypatch):
    from eqx_vision.layers import _attention

    monkeypatch.setattr(_attention, "MAX_SCORES", 10)
    q = jax.random.normal(jax.random.key(0), (2, 7, 4))
    dropout = eqx.nn.Dropout(0.5)
    run = jax.jit(lambda key: _attention.attend(q, q, q, scale=1.0, dropout=dropout, key=key))
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    # Seven identical queries, one per chunk: without dropout every output row is the
    # same, so rows that differ show that each chunk draws its own mask.
    kv = jax.random.normal(jax.random.key(3), (2, 7, 4))
    same = jnp.broadcast_to(kv[:, :1], kv.shape)
    plain = _attention.attend(same, kv, kv, scale=1.0)
    np.testing.assert_allclose(plain, jnp.broadcast_to(plain[:, :1], plain.shape), rtol=1e-6)
    rows = jax.jit(lambda key: _attention.attend(same, kv, kv, scale=1.0, dropout=dropout, key=key))
    dropped = rows(jax.random.key(1))
    assert not np.allclose(dropped[:, 1:], dropped[:, :1])


@pytest.mark.parametrize("num_cls", [0, 1, 2])
def test_class_tokens_positions_and_pooling(num_cls):
    tokens = jnp.arange(12.0).reshape(4, 3).astype(jnp.bfloat16)
    cls_token = jnp.full((num_cls, 3), -1.0)
    pos = jnp.arange(3.0 * (4 + num_cls)).reshape(4 + num_cls, 3) / 10
    out = with_class_tokens(tokens, cls_token, pos)
    assert out.dtype == jnp.bfloat16 and out.shape == (4 + num_cls, 3)
    expected = jnp.concatenate([cls_token, tokens.astype(jnp.float32)]) + pos
    np.testing.assert_array_equal(out, expected.astype(jnp.bfloat16))
    np.testing.assert_array_equal(pool_tokens(out, "cls"), out[0])
    np.testing.assert_allclose(pool_tokens(out, "mean"), out.astype(jnp.float32).mean(0), rtol=1e-2)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'; got 'max'"):
        pool_tokens(out, "max")


class _TinyViT(AbstractClassTokenViT):
    """A variant of the form written from the abstract base: fields and `__init__` only."""

    to_patch_embedding: PatchEmbedding
    cls_token: jax.Array
    pos_embedding: jax.Array
    dropout: eqx.nn.Dropout
    transformer: Transformer
    head_norm: LayerNorm
    mlp_head: Linear
    image_size: tuple[int, int] = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    def __init__(self, *, pool, dropout=0.0, key):
        keys = jax.random.split(key, 5)
        self.to_patch_embedding = PatchEmbedding(2, (4, 2), 16, key=keys[0])
        self.cls_token = jax.random.normal(keys[1], (1, 16))
        self.pos_embedding = jax.random.normal(keys[2], (2 * 4 + 1, 16))
        self.dropout = eqx.nn.Dropout(dropout)
        self.transformer = Transformer(16, 2, 2, 8, 32, dropout=dropout, key=keys[3])
        self.head_norm = LayerNorm(16)
        self.mlp_head = Linear(16, 5, key=keys[4])
        self.image_size = (8, 8)
        self.channels = 2
        self.pool = pool


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_class_token_vit_base_composes_its_fields(pool):
    model = _TinyViT(pool=pool, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    tokens = model.transformer(
        with_class_tokens(model.to_patch_embedding(x), model.cls_token, model.pos_embedding)
    )
    expected = model.mlp_head(model.head_norm(pool_tokens(tokens, pool)))
    np.testing.assert_allclose(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"_TinyViT.*\(2, 8, 8\).*\(2, 8, 6\)"):
        model(x[:, :, :6])
    stochastic = _TinyViT(pool=pool, dropout=0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        stochastic(x)
    a, b = (stochastic(x, key=jax.random.key(k)) for k in (2, 3))
    assert a.shape == (5,) and not np.allclose(a, b)


def test_class_token_vit_base_needs_every_field():
    class Empty(AbstractClassTokenViT):
        pass

    with pytest.raises(TypeError) as info:
        Empty()  # pyright: ignore
    fields = ("to_patch_embedding", "cls_token", "pos_embedding", "dropout", "transformer")
    for name in (*fields, "head_norm", "mlp_head", "image_size", "channels", "pool"):
        assert repr(name) in str(info.value)
    for cls in (ev.DeepViT, ev.ParallelViT, ev.SmallDatasetViT):
        assert issubclass(cls, AbstractClassTokenViT)


@pytest.mark.parametrize(
    "build, argument, value",
    [
        (lambda **a: Linear(**{"in_features": 3, "out_features": 4, **a}), "in_features", 2.5),
        (lambda **a: Linear(**{"in_features": 3, "out_features": 4, **a}), "use_bias", 1),
        (lambda **a: Attention(**{"dim": 8, "heads": 2, **a}), "heads", 2.0),
        (lambda **a: Attention(**{"dim": 8, "heads": 2, **a}), "dropout", 1.0),
        (
            lambda **a: Conv2d(**{"in_channels": 3, "out_channels": 4, "kernel_size": 3, **a}),
            "kernel_size",
            (3, 3, 3),
        ),  # fmt: skip
        (lambda key, **a: LayerNorm(**{"dim": 4, **a}), "dim", True),
        (lambda **a: Stack(**{"make_block": lambda key: None, "depth": 2, **a}), "depth", 2.0),
        (
            lambda **a: Stack(**{"make_block": lambda key: None, "depth": 2, **a}),
            "layer_dropout",
            1.5,
        ),
    ],
)
def test_layers_check_their_arguments(build, argument, value):
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)) as info:
        build(**{argument: value}, key=jax.random.key(0))
    assert argument in str(info.value)

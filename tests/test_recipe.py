"""The training recipe: label smoothing, mixup and cutmix, the soft-target loss, gradient
accumulation, the moving average of the weights, top-k accuracy and the confusion matrix;
and their flags of `eqx-vision train` and `evaluate`."""

import csv
import json
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from eqx_vision import data, training
from eqx_vision.cli import main


PROPERTY = settings(max_examples=20, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
TINY = ["--model", "vit-tiny", "--image-size", "8", "--batch-size", "16", "--seed", "1"]
RECIPE = ("label_smoothing", "mixup", "cutmix", "mix_prob", "switch_prob", "accumulate",
          "clip_norm", "ema_decay", "eval_ema")  # fmt: skip
DEIT = ["--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1", "--ema", "0.99",
        "--eval-ema", "--accumulate", "2"]  # fmt: skip


class Linear(eqx.Module):
    """A stateless model without dropout: logits linear in the pixels."""

    linear: eqx.nn.Linear

    def __init__(self, key, channels: int = 2, size: int = 4, classes: int = 3):
        self.linear = eqx.nn.Linear(channels * size * size, classes, key=key)

    def __call__(self, x, *, key=None):
        del key
        return self.linear(x.reshape(-1))


def batch(seed: int, n: int = 8, channels: int = 2, size: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, channels, size, size)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(rng.integers(0, classes, n), jnp.int32)


# ---- label smoothing and the soft-target loss ---------------------------------------------


@PROPERTY
@given(classes=st.integers(1, 40), smoothing=st.floats(0, 0.99), seed=SEEDS)
def test_soft_labels_sum_to_one(classes, smoothing, seed):
    labels = np.random.default_rng(seed).integers(0, classes, 7)
    targets = np.asarray(training.smooth_labels(jnp.asarray(labels), classes, smoothing))
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    off = smoothing / classes  # timm's mixup_target
    expected = np.full((7, classes), off)
    expected[np.arange(7), labels] = 1 - smoothing + off
    np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-7)


def test_smoothing_out_of_range_is_refused():
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"smoothing must be a number in \[0, 1\)"):
            training.smooth_labels(jnp.zeros(2, jnp.int32), 3, bad)


def test_soft_cross_entropy_of_one_hot_targets_is_the_cross_entropy():
    logits = jr.normal(jr.key(0), (6, 5)) * 3
    labels = jnp.arange(6) % 5
    soft = training.soft_cross_entropy(logits, jax.nn.one_hot(labels, 5))
    hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    assert (soft > 0).all()


@eqx.filter_jit
def todays_step(model, state, opt_state, images, labels, key, optimizer):
    """The training step as it was before the recipe (`train_step` on one device): the
    integer-label cross-entropy."""

    def loss(model, state):
        logits, state = training.apply_model(model, state, images, key=key)
        logits = logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), state, opt_state, value


OFF: tuple[dict[str, Any], ...] = (
    {},
    {"label_smoothing": 0.0},
    {"mixup": training.Mixup()},
    {"mixup": training.Mixup(0.8, 1.0, prob=0.0), "label_smoothing": 0.0},
)


@settings(max_examples=6, deadline=None)
@given(seed=SEEDS)
def test_options_off_reproduce_todays_losses_exactly(seed):
    """With every option off, the loss and the steps are bit for bit those of the step
    without the recipe, whatever the model and batch."""
    model, state = eqx.nn.make_with_state(Linear)(jr.key(seed % 1000))
    images, labels = batch(seed)
    key = jr.key(seed)
    logits, _ = training.apply_model(model, state, images, key=key)
    today = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    for options in OFF:
        loss, _ = training.loss_fn(model, state, images, labels, key, **options)
        assert np.asarray(loss) == np.asarray(today), options
    optimizer = training.make_optimizer(1e-2, total_steps=5, warmup_steps=1)
    spelled_out = training.make_optimizer(1e-2, total_steps=5, warmup_steps=1, clip_norm=1.0,
                                          accumulate=1, ema_decay=None)  # fmt: skip
    opt_state = training.init_optimizer(optimizer, model)
    a = b = (model, state, opt_state)
    for step in range(3):
        step_key = jr.fold_in(key, step)
        a = todays_step(a[0], a[1], a[2], images, labels, step_key, optimizer)[:3]
        b = training.train_step(b[0], b[1], b[2], images, labels, step_key, optimizer=spelled_out,
                                label_smoothing=0.0, mixup=training.Mixup())[:3]  # fmt: skip
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_smoothing_changes_the_loss_as_timm():
    model, state = eqx.nn.make_with_state(Linear)(jr.key(0))
    images, labels = batch(0)
    logits, _ = training.apply_model(model, state, images)
    loss, _ = training.loss_fn(model, state, images, labels, label_smoothing=0.1)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    targets = np.full(log_p.shape, 0.1 / 3)
    targets[np.arange(len(labels)), np.asarray(labels)] += 0.9
    assert float(loss) == pytest.approx(float(-(targets * log_p).sum(-1).mean()), rel=1e-6)


# ---- mixup and cutmix ----------------------------------------------------------------------


def images_of(height: int, width: int, n: int = 4) -> jax.Array:
    """Image i all `i + 1`: a pixel tells which image it comes from."""
    return jnp.broadcast_to(jnp.arange(1.0, n + 1)[:, None, None, None], (n, 2, height, width))


@PROPERTY
@given(seed=SEEDS, mixup=st.floats(0.05, 3), cutmix=st.floats(0.05, 3))
def test_unmixed_batches_are_unchanged(seed, mixup, cutmix):
    """lam = 1 (never mixed with `prob=0`, or a draw that leaves the batch) changes nothing,
    to the bit, images and targets alike."""
    images, labels = batch(seed)
    never = training.Mixup(mixup, cutmix, prob=0.0)
    out, lam = never.mix_images(jr.key(seed), images)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(out, images)
    targets = training.smooth_labels(labels, 3, 0.1)
    np.testing.assert_array_equal(training.mix_targets(targets, lam), targets)
    out, lam = training.Mixup(mixup, cutmix, prob=0.5).mix_images(jr.key(seed), images)
    assert (float(lam) == 1.0) == bool(np.array_equal(out, images))


@PROPERTY
@given(seed=SEEDS, height=st.integers(1, 12), width=st.integers(1, 12), alpha=st.floats(0.05, 3))
def test_cutmix_pasted_area_equals_its_label_weight(seed, height, width, alpha):
    """The area cutmix pastes (a rectangle of the flipped batch, the same in every image and
    channel) is `1 - lam`, the weight the targets give the pasted image."""
    images = images_of(height, width)
    out, lam = training.Mixup(cutmix_alpha=alpha).mix_images(jr.key(seed), images)
    out, lam = np.asarray(out), float(lam)
    flipped = np.asarray(images)[::-1]
    pasted = out != np.asarray(images)
    assert np.array_equal(out, np.where(pasted, flipped, images))
    assert (pasted == pasted[:1, :1]).all()
    box = pasted[0, 0]
    assert np.array_equal(box, np.outer(box.any(1), box.any(0)))  # a rectangle
    assert box.mean() == pytest.approx(1 - lam, abs=1e-6)
    one_hot = jax.nn.one_hot(jnp.arange(4), 4)
    mixed = np.asarray(training.mix_targets(one_hot, lam))
    assert mixed[0, 0] == pytest.approx(lam) and mixed[0, 3] == pytest.approx(1 - lam)


@PROPERTY
@given(seed=SEEDS, alpha=st.floats(0.05, 3))
def test_mixup_blends_each_image_with_its_pair(seed, alpha):
    images, labels = batch(seed)
    out, lam = training.Mixup(mixup_alpha=alpha).mix_images(jr.key(seed), images)
    lam = float(lam)
    assert 0 <= lam <= 1
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-6)


def test_switch_and_mix_probabilities():
    """Over 200 keys: with both on, about `switch_prob` of the mixed batches get cutmix,
    and about `prob` of the batches are mixed."""
    draws = [training.Mixup(0.8, 1.0, prob=0.7, switch_prob=0.3).sample(jr.key(i), 6, 6)
             for i in range(200)]  # fmt: skip
    mixed = [d for d in draws if float(d.lam) < 1]
    assert 0.6 < len(mixed) / 200 < 0.8
    assert 0.2 < np.mean([bool(d.cutmix) for d in mixed]) < 0.4
    only_cutmix = training.Mixup(cutmix_alpha=1.0).sample(jr.key(0), 6, 6)
    assert bool(only_cutmix.cutmix)
    assert not bool(training.Mixup(mixup_alpha=1.0, switch_prob=1.0).sample(jr.key(0), 6, 6).cutmix)


@PROPERTY
@given(seed=SEEDS)
def test_mixing_is_determined_by_the_key(seed):
    """The same key mixes the same way (images and loss, bit for bit); the loss's mixing key
    is split off the step key, so another key mixes otherwise."""
    mixer = training.Mixup(0.8, 1.0, prob=0.9)
    images, labels = batch(seed)
    a, b = mixer.mix_images(jr.key(seed), images), mixer.mix_images(jr.key(seed), images)
    np.testing.assert_array_equal(a[0], b[0])
    model, state = eqx.nn.make_with_state(Linear)(jr.key(0))
    loss = lambda key: np.asarray(  # noqa: E731
        training.loss_fn(model, state, images, labels, key, mixup=mixer)[0]
    )
    assert loss(jr.key(seed)) == loss(jr.key(seed))


def test_other_keys_mix_otherwise():
    mixer = training.Mixup(0.8, 1.0)
    images, labels = batch(0)
    model, state = eqx.nn.make_with_state(Linear)(jr.key(0))
    losses = {float(training.loss_fn(model, state, images, labels, jr.key(i), mixup=mixer)[0])
              for i in range(6)}  # fmt: skip
    assert len(losses) == 6
    with pytest.raises(ValueError, match="mixup needs a key"):
        training.loss_fn(model, state, images, labels, None, mixup=mixer)


def test_mixup_settings_are_checked():
    for kwargs, name in (({"mixup_alpha": -1.0}, "mixup_alpha"), ({"cutmix_alpha": np.inf},
                         "cutmix_alpha"), ({"prob": 1.5}, "prob"), ({"switch_prob": -0.1},
                         "switch_prob")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            training.Mixup(**kwargs)
    assert not training.Mixup().enabled and not training.Mixup(1.0, prob=0.0).enabled


# ---- gradient accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_steps_equal_one_step_on_the_whole_batch(k):
    """`accumulate=k` over k batches of 4 is one update on their 4k images: the same
    parameters after each of three updates (to float32 rounding: a running mean of the
    gradients against the mean over the batch), the steps between updates leaving the
    model exactly as it is. The gradients are clipped to a norm above their mean's and
    below their sum's, so that a sum in place of the mean shows. (A BatchNorm model
    differs: its batch statistics are those of each batch of 4.)"""
    model, state = eqx.nn.make_with_state(Linear)(jr.key(1))
    images, labels = batch(3, n=3 * 4 * k)

    def optimizer(accumulate: int) -> optax.GradientTransformation:
        return training.make_optimizer(3e-2, total_steps=3, warmup_steps=0, weight_decay=0.05,
                                       clip_norm=2.0, accumulate=accumulate)  # fmt: skip

    small, big = optimizer(k), optimizer(1)
    a, a_state, a_opt = model, state, training.init_optimizer(small, model)
    b, b_state, b_opt = model, state, training.init_optimizer(big, model)
    for update in range(3):
        start = update * 4 * k
        for i in range(k):
            before = a
            rows = slice(start + i * 4, start + (i + 1) * 4)
            a, a_state, a_opt, _ = training.train_step(
                a, a_state, a_opt, images[rows], labels[rows], jr.key(0), optimizer=small
            )
            if i < k - 1:
                np.testing.assert_array_equal(a.linear.weight, before.linear.weight)
        rows = slice(start, start + 4 * k)
        b, b_state, b_opt, _ = training.train_step(
            b, b_state, b_opt, images[rows], labels[rows], jr.key(0), optimizer=big
        )
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)  # measured: at most 6e-8


def test_make_optimizer_checks_the_recipe():
    cases: list[tuple[dict[str, Any], str]] = [
        ({"accumulate": 0}, "accumulate"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"ema_decay": 1.5}, "decay"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            training.make_optimizer(1e-3, total_steps=10, **kwargs)
    # clip_norm 0 is no clipping: the chain is AdamW's alone.
    params = {"w": jnp.ones(3)}
    unclipped = training.make_optimizer(1e-3, total_steps=10, clip_norm=0.0)
    assert jax.tree.structure(unclipped.init(params)) == jax.tree.structure(
        training.make_optimizer(1e-3, total_steps=10, clip_norm=None).init(params)
    )


# ---- the moving average of the weights --------------------------------------------------------


@PROPERTY
@given(decay=st.floats(0, 0.999), n=st.integers(1, 6))
def test_ema_after_n_steps_is_the_closed_form(decay, n):
    """With SGD on a constant gradient, p_i = p_0 - i lr g, and the average after n steps is
    decay^n p_0 + (1 - decay) sum_i decay^(n - i) p_i."""
    p0, g, lr = np.array([1.0, -2.0, 3.0]), np.array([0.5, 1.0, -1.0]), 0.1
    optimizer = optax.chain(optax.sgd(lr), training.ema_params(decay))
    params = {"w": jnp.asarray(p0, jnp.float32)}
    opt_state = optimizer.init(params)
    for _ in range(n):
        updates, opt_state = optimizer.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
    expected = decay**n * p0 + (1 - decay) * sum(
        decay ** (n - i) * (p0 - i * lr * g) for i in range(1, n + 1)
    )
    averaged: dict[str, jax.Array] = training.ema_model(params, opt_state)
    np.testing.assert_allclose(averaged["w"], expected, rtol=1e-5, atol=1e-6)
    (final,) = jax.tree.leaves(params)
    np.testing.assert_allclose(final, p0 - n * lr * g, rtol=1e-5, atol=1e-6)


def test_ema_model_with_accumulation():
    """In `make_optimizer`, the average is taken once per update (every `accumulate`
    steps), of the model after it; `ema_model` puts it in the model."""
    model, state = eqx.nn.make_with_state(Linear)(jr.key(1))
    optimizer = training.make_optimizer(1e-2, total_steps=4, ema_decay=0.5, accumulate=2,
                                        skip_non_finite=2)  # fmt: skip
    opt_state = training.init_optimizer(optimizer, model)
    assert training.has_ema(opt_state)
    expected = model.linear.weight
    np.testing.assert_array_equal(training.ema_model(model, opt_state).linear.weight, expected)
    images, labels = batch(0)
    for step in range(4):
        model, state, opt_state, _ = training.train_step(
            model, state, opt_state, images[step % 2 :: 2], labels[step % 2 :: 2],
            jr.key(step), optimizer=optimizer,
        )  # fmt: skip
        if step % 2 == 1:  # an update: ema = 0.5 ema + 0.5 weights
            expected = 0.5 * expected + 0.5 * model.linear.weight
        averaged = training.ema_model(model, opt_state)
        np.testing.assert_allclose(averaged.linear.weight, expected, rtol=1e-6)
        np.testing.assert_array_equal(averaged.linear.bias.shape, model.linear.bias.shape)
    plain = training.make_optimizer(1e-2, total_steps=4)
    with pytest.raises(ValueError, match="holds no moving average"):
        training.ema_model(model, training.init_optimizer(plain, model))
    other = eqx.nn.make_with_state(Linear)(jr.key(0), classes=4)[0]
    with pytest.raises(ValueError, match="another structure"):
        training.ema_model(other, opt_state)


# ---- top-k accuracy, the confusion matrix and per-class accuracy -----------------------------


@PROPERTY
@given(seed=SEEDS, classes=st.integers(1, 12))
def test_top5_is_at_least_top1(seed, classes):
    """Logits with many ties: top-1 is the argmax, the top 5 are those ranked before 5 (the
    lower class first among equals), and hold the top 1."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(-2, 3, (16, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 16)
    top1 = np.asarray(training.top_k_correct(jnp.asarray(logits), jnp.asarray(labels), 1))
    top5 = np.asarray(training.top_k_correct(jnp.asarray(logits), jnp.asarray(labels), 5))
    assert np.array_equal(top1, logits.argmax(-1) == labels)
    mine = logits[np.arange(16), labels][:, None]
    lower = np.arange(classes)[None, :] < labels[:, None]
    rank = (logits > mine).sum(-1) + ((logits == mine) & lower).sum(-1)
    assert np.array_equal(top5, rank < 5)
    assert (top5 >= top1).all()
    mask = jnp.asarray(rng.random(16) < 0.7)
    assert training.top_k_accuracy(jnp.asarray(logits), jnp.asarray(labels), 5, mask) >= (
        training.top_k_accuracy(jnp.asarray(logits), jnp.asarray(labels), 1, mask)
    )


@PROPERTY
@given(seed=SEEDS, classes=st.integers(1, 8))
def test_confusion_matrix_counts_true_against_predicted(seed, classes):
    rng = np.random.default_rng(seed)
    predictions, labels = rng.integers(0, classes, (2, 20))
    mask = rng.random(20) < 0.8
    matrix = np.asarray(training.confusion_matrix(
        jnp.asarray(predictions), jnp.asarray(labels), classes, jnp.asarray(mask)
    ))  # fmt: skip
    expected = np.zeros((classes, classes), int)
    np.add.at(expected, (labels[mask], predictions[mask]), 1)
    assert np.array_equal(matrix, expected)
    per_class = training.per_class_accuracy(matrix)
    for c in range(classes):
        mine = mask & (labels == c)
        if mine.any():
            assert per_class[c] == pytest.approx(np.mean(predictions[mine] == c))
        else:
            assert np.isnan(per_class[c])


def test_evaluate_details_agrees_with_evaluate_batches():
    """The loss and accuracy of `evaluate_batches`, to the bit, with the top-5 accuracy and
    the confusion matrix of the logits, on one device and sharded over four."""
    model, state = eqx.nn.make_with_state(Linear)(jr.key(2), classes=7)
    images, labels = batch(5, n=22, classes=7)
    logits = np.asarray(jax.vmap(model)(images))
    labels_ = np.asarray(labels)
    for parallel in (None, training.DataParallel.create(4)):
        got = training.evaluate_details(
            model, state, data.padded_batches(np.asarray(images), labels_, 8), parallel=parallel
        )
        loss, accuracy = training.evaluate_batches(
            model, state, data.padded_batches(np.asarray(images), labels_, 8), parallel=parallel
        )
        assert (got.loss, got.accuracy, got.count) == (loss, accuracy, 22)
        top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
        assert got.top_k_accuracy == pytest.approx(np.mean((top5 == labels_[:, None]).any(-1)))
        expected = np.zeros((7, 7), int)
        np.add.at(expected, (labels_, logits.argmax(-1)), 1)
        assert got.confusion is not None and np.array_equal(got.confusion, expected)
        assert np.trace(got.confusion) / 22 == pytest.approx(accuracy)


# ---- TrainConfig ---------------------------------------------------------------------------


def test_train_config_checks_and_records_the_recipe(no_typecheck):
    """The errors a user without the jaxtyping hook gets too."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"mixup": -0.5}, "mixup"),
        ({"cutmix": float("nan")}, "cutmix"),
        ({"mix_prob": 2}, "mix_prob"),
        ({"switch_prob": -1}, "switch_prob"),
        ({"accumulate": 0}, "accumulate"),
        ({"clip_norm": -1}, "clip_norm"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"eval_ema": 1}, "eval_ema"),
        ({"eval_ema": True}, "set ema_decay"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            training.TrainConfig(**kwargs)
    config = training.TrainConfig(mixup=0.8, cutmix=1.0, ema_decay=0.999, eval_ema=True)
    assert config.mixing() == training.Mixup(0.8, 1.0, 1.0, 0.5)
    assert training.TrainConfig().mixing() is None
    saved = training.TrainConfig().to_json()
    assert {"label_smoothing", "accumulate", "clip_norm", "ema_decay", "eval_ema"} <= set(saved)
    assert config.changes_from(saved) == [
        "mixup=0.0, not 0.8", "cutmix=0.0, not 1.0", "ema_decay=None, not 0.999",
        "eval_ema=False, not True",
    ]  # fmt: skip
    # A run saved before the recipe had it all off.
    old = {k: v for k, v in saved.items() if k not in RECIPE}
    assert training.TrainConfig().changes_from(old) == []
    assert config.changes_from(old) == config.changes_from(saved)


def test_fit_trains_with_the_recipe():
    """`fit` passes each option to its steps (each changes the training loss), counts
    optimizer updates with `accumulate`, and keeps the average in the optimizer state."""
    images, labels = batch(7, n=40)
    ds = data.Dataset(np.asarray(images[:32]), np.asarray(labels[:32]), np.asarray(images[32:]),
                      np.asarray(labels[32:]), ("a", "b", "c"), "random")  # fmt: skip

    def train(**options):
        model, state = eqx.nn.make_with_state(Linear)(jr.key(0))  # fit donates its arrays
        config = training.TrainConfig(epochs=2, batch_size=8, warmup_epochs=0.0, **options)
        return training.fit(model, state, ds, config)

    plain = train()
    losses = {plain.metrics[-1]["train_loss"]}
    for options in ({"label_smoothing": 0.1}, {"mixup": 0.8}, {"cutmix": 1.0},
                    {"clip_norm": 1e-3}):  # fmt: skip
        losses.add(train(**options).metrics[-1]["train_loss"])
    assert len(losses) == 5
    assert "eval_weights" not in plain.metrics[-1] and plain.metrics[-1]["test_top5"] == 1.0
    averaged = train(accumulate=3, ema_decay=0.9, eval_ema=True)
    assert isinstance(averaged.opt_state, optax.MultiStepsState)
    assert averaged.opt_state.gradient_step == 2  # 8 steps, one update per 3: 2 updates
    assert training.has_ema(averaged.opt_state)
    last = averaged.metrics[-1]
    assert last["eval_weights"] == "ema" and last["test_loss"] != last["raw_test_loss"]
    schedule = training.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=2)
    assert last["learning_rate"] == pytest.approx(float(np.asarray(schedule(2))), abs=1e-12)
    with pytest.raises(ValueError, match="accumulate 9 is more than the run's 8 steps"):
        train(accumulate=9)


# ---- the command line -------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory, small_npz) -> str:
    """Two tiny epochs with DeiT's recipe, the moving average evaluated, two batches an
    update."""
    out = str(tmp_path_factory.mktemp("recipe") / "deit")
    argv = ["train", *TINY, *DEIT, "--data", small_npz, "--epochs", "2", "--warmup-epochs",
            "1", "--out", out, "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_train_with_the_recipe(deit_run, capsys):
    with open(os.path.join(deit_run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [6, 12]  # 96 images, batch 16: 3 updates of 32
    for record in records:
        assert record["eval_weights"] == "ema"
        for name in ("test_loss", "test_accuracy", "test_top5"):
            assert np.isfinite(record[name]) and np.isfinite(record[f"raw_{name}"])
        assert record["test_loss"] != record["raw_test_loss"]
        assert record["test_top5"] >= record["test_accuracy"]
    # The schedule counts updates: a warm-up of 3 (an epoch), then the decay to update 6.
    schedule = training.learning_rate_schedule(1e-3, warmup_steps=3, total_steps=6)
    assert [r["learning_rate"] for r in records] == [
        pytest.approx(float(np.asarray(schedule(3)))),
        pytest.approx(float(np.asarray(schedule(6))), abs=1e-12),
    ]  # fmt: skip
    assert records[0]["learning_rate"] == pytest.approx(1e-3)
    with open(os.path.join(deit_run, "config.json")) as f:
        config = json.load(f)
    assert {k: config["settings"][k] for k in ("mixup", "cutmix", "label_smoothing", "ema",
            "eval_ema", "accumulate", "mix_prob", "switch_prob", "clip_norm")} == {
        "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "ema": 0.99, "eval_ema": True,
        "accumulate": 2, "mix_prob": 1.0, "switch_prob": 0.5, "clip_norm": 1.0}  # fmt: skip
    saved = config["train_config"]
    assert (saved["ema_decay"], saved["eval_ema"], saved["accumulate"]) == (0.99, True, 2)
    code, _, err = run(capsys, "train", "--out", deit_run, "--resume", "--mixup", "0.5")
    assert code == 2 and "was trained with --mixup 0.8, not 0.5" in err


@pytest.mark.slow
def test_recipe_resume_equals_uninterrupted(tmp_path, small_npz, capsys):
    """Stopped in epoch 2 and resumed, a run with the whole recipe ends as the uninterrupted
    one, to the bit: the mixing keys come from the step, and the moving average and the
    gradients accumulated across the epoch's end (4 batches an update, 6 an epoch) are in
    the checkpoint (fast siblings: `test_mixing_is_determined_by_the_key`,
    `test_train_with_the_recipe`)."""
    from test_cli import stopped_and_resumed_vs_whole

    argv = ["train", *TINY, *DEIT[:-2], "--accumulate", "4", "--data", small_npz, "--epochs", "3",
            "--no-progress"]  # fmt: skip
    a, b = stopped_and_resumed_vs_whole(capsys, tmp_path, argv)
    assert a.keys() == b.keys() and any(".ema." in name for name in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_recipe_flags_are_checked(tmp_path, small_npz, capsys):
    base = ["train", *TINY, "--data", small_npz, "--epochs", "1", "--out", str(tmp_path / "x")]
    for flags, message in (
        (["--label-smoothing", "1"], "--label-smoothing: expected a number in [0, 1); got '1'"),
        (["--mixup", "-1"], "--mixup: expected a non-negative number"),
        (["--mix-prob", "1.5"], "--mix-prob: expected a number in [0, 1]"),
        (["--switch-prob", "x"], "--switch-prob: expected a number in [0, 1]"),
        (["--accumulate", "0"], "--accumulate: expected a positive integer"),
        (["--clip-norm", "nan"], "--clip-norm: expected a non-negative number"),
        (["--ema", "1"], "--ema: expected a number in [0, 1)"),
        (["--eval-ema"], "--eval-ema evaluates the moving average of --ema"),
        (["--accumulate", "7"], "--accumulate 7 is more than the run's 6 steps"),
    ):
        code, _, err = run(capsys, *base, *flags)
        assert code == 2, (flags, err)
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not os.path.exists(tmp_path / "x")


def test_evaluate_confusion(deit_run, small_npz, tmp_path, capsys):
    """`evaluate` of a run trained with --eval-ema evaluates the moving average, as the run
    did (--no-ema the trained weights), prints top-5 and per-class accuracy, and writes
    the confusion matrix as a PNG, a CSV and JSON."""
    with open(os.path.join(deit_run, "metrics.jsonl")) as f:
        record = [json.loads(line) for line in f][-1]
    picture = str(tmp_path / "plots" / "confusion.png")
    code, out, err = run(capsys, "evaluate", "--checkpoint", deit_run, "--confusion", picture)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-3:] == [f"top-5 accuracy: {record['test_top5']:.4f}",
                          f"test loss: {record['test_loss']:.4f}",
                          f"test accuracy: {record['test_accuracy']:.2f}"]  # fmt: skip
    assert "weights    the moving average of the weights (--ema)" in lines
    with open(picture, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(str(tmp_path / "plots" / "confusion.json")) as f:
        numbers = json.load(f)
    matrix = np.asarray(numbers["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == numbers["count"] == 40
    assert np.trace(matrix) / 40 == pytest.approx(record["test_accuracy"])
    with open(str(tmp_path / "plots" / "confusion.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == numbers["class_names"] == list("0123456789")
    assert np.array_equal(np.asarray([r[1:] for r in rows[1:]], int), matrix)
    start = lines.index("per-class accuracy:")
    for c in range(10):  # "  <class>  <accuracy>  <correct>/<images>"
        name, accuracy, counts = lines[start + 1 + c].split()
        assert (name, counts) == (str(c), f"{matrix[c, c]}/{matrix[c].sum()}")
    code, out, _ = run(capsys, "evaluate", "--checkpoint", deit_run, "--no-ema")
    assert out.strip().splitlines()[-2] == f"test loss: {record['raw_test_loss']:.4f}"
    code, _, err = run(capsys, "evaluate", "--checkpoint", deit_run, "--confusion", "x.jpg")
    assert code == 2 and "--confusion expects a .png path" in err


def test_evaluate_without_an_average(small_npz, capsys):
    """A checkpoint without a moving average (of a run saved before the recipe): --ema is a
    clear error; the per-class table of many classes shows the worst ones only."""
    from eqx_vision import cli

    old = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints", "vit-tiny")
    code, _, err = run(capsys, "evaluate", "--checkpoint", old, "--data", small_npz, "--ema")
    assert code == 2 and "holds no moving average of the weights" in err
    result = training.Evaluation(1.0, 0.5, 5, 0.7, 30, np.diag(np.arange(30)) + 1)
    cli._print_per_class(result, [f"class{i}" for i in range(30)], None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("per-class accuracy (the 10 lowest of 30 classes")
    assert [line.split()[0] for line in lines[1:]] == [f"class{i}" for i in range(10)]

"""Fine-tuning: weight-decay labels, layer ids and layer-wise decay along stacked axes,
freezing, the CLI's --init / --layer-decay / --freeze, and the digits demo (fine-tuning
reaches the target accuracy in fewer steps than training from scratch)."""

import importlib.util
import sys
from pathlib import Path
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_vision as ev
import tiny
from eqx_vision import checkpoint, finetune, presets, training
from eqx_vision.cli import main
from eqx_vision.layers import BatchNorm, ChannelLayerNorm, Conv2d, LayerNorm, Linear


ROOT = Path(__file__).resolve().parents[1]


def table(model) -> dict[str, tuple[str, np.ndarray]]:
    """`path -> (label, layer id)` of every parameter."""
    return {path: (label, i) for path, label, i in finetune._iter_labels(model)}


def labels_of(model) -> dict[str, str]:
    return {path: label for path, (label, _) in table(model).items()}


def small_vit(**kwargs):
    base = dict(image_size=16, patch_size=4, num_classes=5, dim=32, depth=3, heads=2,
                dim_head=16, mlp_dim=64, channels=1)  # fmt: skip
    return ev.ViT(**{**base, **kwargs}, key=jax.random.key(0))


# --------------------------------------------------------------------------------------
# Weight-decay labels


def test_vit_labels_by_role():
    model = small_vit(distillation_token=True, num_registers=2, layer_scale=0.1, fc_norm=True,
                      pool="cls", qkv_bias=True)  # fmt: skip
    labels = labels_of(model)
    assert labels["cls_token"] == labels["dist_token"] == labels["reg_tokens"] == "token"
    assert labels["pos_embedding"] == "position"
    assert labels["transformer.layers.blocks.attn_scale"] == "layer_scale"
    assert labels["transformer.layers.blocks.ff_scale"] == "layer_scale"
    assert labels["transformer.layers.blocks.attn.norm.weight"] == "norm"
    assert labels["transformer.layers.blocks.attn.to_qkv.bias"] == "bias"
    assert labels["transformer.layers.blocks.attn.to_qkv.weight"] == "weight"
    assert labels["mlp_head.weight"] == labels["dist_head.weight"] == "weight"
    assert labels["mlp_head.bias"] == "bias"
    # the patch embedding's norms are norms, its linear layer a weight
    assert labels["to_patch_embedding.pre_norm.weight"] == "norm"
    assert labels["to_patch_embedding.linear.weight"] == "weight"
    mask = training.weight_decay_mask(model)
    assert mask.transformer.layers.blocks.ff.fc1.weight is True
    assert mask.transformer.layers.blocks.ff.fc1.bias is False
    assert mask.cls_token is False and mask.pos_embedding is False


@pytest.mark.parametrize(
    "name, expected",
    [
        ("CaiT", {"cls_token": "token", "patch_transformer.layers.blocks.attn_scale":
                  "layer_scale", "patch_transformer.layers.blocks.attn.mix_pre": "weight"}),
        ("CvT", {"stages.0.norm.weight": "norm", "stages.0.embed.weight": "weight",
                 "stages.0.blocks.blocks.attn.to_q.depthwise.bn.weight": "norm",
                 "stages.0.blocks.blocks.attn.to_q.depthwise.conv.weight": "weight"}),
        ("LeViT", {"stages.0.blocks.attn.pos_bias": "position"}),
        ("RegionViT", {"stages.0.rel_pos_bias": "position"}),
        ("NesT", {"levels.0.pos_embedding": "position"}),
        ("SmallDatasetViT", {"transformer.layers.blocks.attn.temperature": "other"}),
        ("DeepViT", {"transformer.layers.blocks.attn.reattn_weights": "weight"}),
        ("ViTWithPatchMerger", {"patch_merger.queries": "weight"}),
    ],
)  # fmt: skip
def test_labels_of_architecture_specific_parameters(name, expected):
    model, _ = tiny.build(name, jax.random.key(0))
    labels = labels_of(model)
    for path, label in expected.items():
        assert labels[path] == label, path


def _owners(model):
    """`(owner type, field, leaf)` of every parameter."""
    leaves, _ = finetune._describe(model)
    return [(type(leaf.owner), leaf.field, leaf) for leaf in leaves]


@pytest.mark.parametrize("name", tiny.NAMES)
def test_labels_follow_the_owning_module(name):
    """On every architecture: norms' parameters are "norm", linear and convolution kernels
    "weight", their biases "bias"; every decayed parameter is a matrix or kernel."""
    model, _ = tiny.build(name, jax.random.key(0))
    labels = jax.tree.leaves(training.param_labels(model))
    owners = _owners(model)
    assert len(labels) == len(owners) == len(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    for label, (owner, field, leaf) in zip(labels, owners, strict=True):
        if owner in (LayerNorm, ChannelLayerNorm, BatchNorm):
            assert label == "norm"
        elif owner in (Linear, Conv2d):
            assert label == {"weight": "weight", "bias": "bias"}[str(field)]
        if label == "weight":
            assert leaf.ndim - leaf.axes >= 2


def test_mask_works_with_an_abstract_model_and_adamw():
    """Zero gradients: AdamW's update is the weight decay alone, on the weights only."""
    model = small_vit()
    abstract = eqx.filter_eval_shape(lambda: small_vit())
    assert jax.tree.structure(training.weight_decay_mask(abstract)) == jax.tree.structure(
        training.weight_decay_mask(model)
    )
    optimizer = training.make_optimizer(0.1, weight_decay=0.5, total_steps=10, clip_norm=None,
                                        weight_decay_mask=training.weight_decay_mask)  # fmt: skip
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, opt_state, params)  # step 0: learning rate 0
    updates, _ = optimizer.update(grads, optimizer.update(grads, opt_state, params)[1], params)
    mask = training.weight_decay_mask(model)
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True):
        assert bool(jnp.any(u != 0)) == m


# --------------------------------------------------------------------------------------
# Layer ids and layer-wise decay


def test_vit_layer_ids_and_scales_by_hand():
    """ViT of depth 3: embeddings 0, blocks 1-3 along the stacked axis, final norm and head
    4; scale = decay ** (4 - id), as timm's BEiT recipe (num_layers = depth + 1)."""
    model = small_vit()
    ids = training.layer_ids(model)
    assert training.num_blocks(model) == 3
    assert int(ids.cls_token) == int(ids.pos_embedding) == 0
    assert int(ids.to_patch_embedding.linear.weight) == 0
    np.testing.assert_array_equal(ids.transformer.layers.blocks.ff.fc1.weight, [1, 2, 3])
    assert int(ids.transformer.norm.weight) == int(ids.mlp_head.weight) == 4
    scales = training.layer_decay_scales(model, 0.5)
    np.testing.assert_allclose(scales.transformer.layers.blocks.attn.to_qkv.weight,
                               [0.125, 0.25, 0.5])  # fmt: skip
    assert float(scales.pos_embedding) == 0.0625
    assert float(scales.mlp_head.bias) == 1.0


def test_cait_numbers_the_class_attention_blocks_after_the_patch_blocks():
    model, _ = tiny.build("CaiT", jax.random.key(0), depth=3, cls_depth=2)
    ids = training.layer_ids(model)
    assert training.num_blocks(model) == 5
    assert int(ids.cls_token) == int(ids.pos_embedding) == 0
    np.testing.assert_array_equal(ids.patch_transformer.layers.blocks.attn_scale, [1, 2, 3])
    np.testing.assert_array_equal(ids.cls_transformer.layers.blocks.ff.fc1.weight, [4, 5])
    assert int(ids.mlp_head.weight) == int(ids.head_norm.weight) == 6


def test_hierarchical_model_stages_take_their_embedding():
    """CvT of depths (1, 2, 1): each stage's convolutional embedding and norm take the id
    of the stage's first block."""
    model, _ = tiny.build("CvT", jax.random.key(0), s2_depth=2)
    ids = training.layer_ids(model)
    assert training.num_blocks(model) == 4
    assert int(ids.stages[0].embed.weight) == 0
    np.testing.assert_array_equal(ids.stages[0].blocks.blocks.ff.ff.fc1.weight, [1])
    assert int(ids.stages[1].embed.weight) == int(ids.stages[1].norm.bias) == 2
    np.testing.assert_array_equal(ids.stages[1].blocks.blocks.ff.ff.fc1.weight, [2, 3])
    assert int(ids.stages[2].embed.weight) == 4
    assert int(ids.head.weight) == 5


@pytest.mark.parametrize("name", tiny.NAMES)
def test_every_architecture_has_blocks_and_ids_in_range(name):
    model, _ = tiny.build(name, jax.random.key(0))
    n = training.num_blocks(model)
    assert n >= 1
    ids = [np.asarray(i) for i in jax.tree.leaves(training.layer_ids(model))]
    values = np.concatenate([i.ravel() for i in ids])
    assert values.min() == 0 or name == "T2TViT"  # T2T's first parameters are in a stack
    assert values.max() == n + 1
    assert set(range(1, n + 1)) <= set(values.tolist())


def test_scale_updates_along_the_stacked_axis():
    model = small_vit()
    params = eqx.filter(model, eqx.is_inexact_array)
    transform = training.scale_updates(training.layer_decay_scales(model, 0.5))
    ones = jax.tree.map(jnp.ones_like, params)
    scaled: Any = transform.update(ones, transform.init(params))[0]
    w = scaled.transformer.layers.blocks.ff.fc2.weight
    for row, expected in enumerate([0.125, 0.25, 0.5]):
        assert bool(jnp.all(w[row] == expected))
    assert bool(jnp.all(scaled.to_patch_embedding.linear.weight == 0.0625))
    assert bool(jnp.all(scaled.mlp_head.weight == 1.0))


def test_layer_decay_errors():
    model = small_vit()
    for bad in (0.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"layer decay must be a number in \(0, 1\]"):
            training.layer_decay_scales(model, bad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            training.TrainConfig(layer_decay=bad)
    with pytest.raises(ValueError, match="freeze"):
        training.TrainConfig(freeze=-1)


# --------------------------------------------------------------------------------------
# Freezing


def test_frozen_mask_and_errors():
    model = small_vit()
    frozen = training.frozen_mask(model, 2)
    assert bool(frozen.pos_embedding) and bool(frozen.to_patch_embedding.linear.weight)
    np.testing.assert_array_equal(frozen.transformer.layers.blocks.attn.to_qkv.weight,
                                  [True, True, False])  # fmt: skip
    assert not bool(frozen.mlp_head.weight) and not bool(frozen.transformer.norm.weight)
    nothing = training.frozen_mask(model, 0)
    assert not any(bool(np.any(f)) for f in jax.tree.leaves(nothing))
    with pytest.raises(ValueError, match=r"freeze must be in \[0, 3\] for ViT, which has 3"):
        training.frozen_mask(model, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        training.frozen_mask(model, -1)
    with pytest.raises(TypeError, match="freeze must be an int"):
        training.frozen_mask(model, True)


def test_frozen_parameters_do_not_move_under_adamw_with_weight_decay():
    """Three AdamW steps with weight decay, momentum and layer decay: the embeddings and
    the rows of the first two blocks keep their exact values; the third block and the head
    move."""
    model = small_vit()
    optimizer = training.make_optimizer(
        1e-2, weight_decay=0.5, warmup_steps=0, total_steps=10,
        layer_scales=lambda p: training.layer_decay_scales(p, 0.8),
        frozen=lambda p: training.frozen_mask(p, 2),
    )  # fmt: skip
    state = eqx.nn.State(model)
    opt_state = training.init_optimizer(optimizer, model)
    x = jax.random.normal(jax.random.key(1), (8, 1, 16, 16))
    y = jnp.arange(8) % 5
    new = model
    for step in range(3):
        new, state, opt_state, _ = training.train_step(
            new, state, opt_state, x, y, jax.random.key(step), optimizer=optimizer
        )
    frozen = training.frozen_mask(model, 2)
    old_leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    new_leaves = jax.tree.leaves(eqx.filter(new, eqx.is_inexact_array))
    moved_rows = 0
    for old, now, f in zip(old_leaves, new_leaves, jax.tree.leaves(frozen), strict=True):
        f = np.asarray(f)
        if f.ndim == 0:
            if f:
                np.testing.assert_array_equal(old, now)
            continue
        for row in range(len(f)):
            if f[row]:
                np.testing.assert_array_equal(old[row], now[row])
            else:
                moved_rows += int(not np.array_equal(old[row], now[row]))
    assert moved_rows > 0
    heads = [cast(Any, m).mlp_head.weight for m in (model, new)]
    assert not np.array_equal(*heads)


# --------------------------------------------------------------------------------------
# Command line


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A checkpoint folder of the tiny ViT (8x8, 10 classes), as `train` writes it."""
    config = presets.resolve_model("vit-tiny", num_classes=10, data_channels=1, image_size=8)
    model, state = config.build(jax.random.key(0))
    out = tmp_path_factory.mktemp("init")
    checkpoint.save(out / "last.safetensors", model, state, model_config=config.to_json(),
                    training={"epoch": 1, "step": 1})  # fmt: skip
    return str(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer-decay", "0"], r"--layer-decay: expected a number in \(0, 1\]; got '0'"),
        (["--layer-decay", "1.5"], r"expected a number in \(0, 1\]; got '1.5'"),
        (["--layer-decay", "nan"], r"expected a number in \(0, 1\]; got 'nan'"),
        (["--layer-decay", "x"], r"expected a number in \(0, 1\]; got 'x'"),
        (["--freeze", "-1"], "--freeze: expected a non-negative integer; got '-1'"),
        (["--freeze", "9", "--model", "vit-tiny"], "--freeze 9 is more than the 1 blocks"),
        (["--init", "INIT", "--model", "vit-tiny"], "--init and --model do not go together"),
        (["--init", "MISSING"], "checkpoint not found"),
        (["--init", "INIT", "--image-size", "10"], "--init .*: image_size must be divisible"),
    ],
)
def test_cli_errors(capsys, tmp_path, saved, small_npz, argv, message):
    argv = [saved if a == "INIT" else str(tmp_path / "none") if a == "MISSING" else a
            for a in argv]  # fmt: skip
    code, _, err = run(capsys, "train", "--data", small_npz, "--out", str(tmp_path / "r"), *argv)
    assert code == 2
    assert err.count("\n") == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_cli_init_from_a_checkpoint(capsys, tmp_path, saved, small_npz):
    """--init: a new head for the data's classes, the image size changed, the settings
    saved; evaluate reads the fine-tuned checkpoint back."""
    out = str(tmp_path / "ft")
    code, stdout, err = run(
        capsys, "train", "--init", saved, "--data", small_npz, "--image-size", "12",
        "--layer-decay", "0.75", "--freeze", "1", "--epochs", "1", "--batch-size", "32",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "input 1x12x12" in stdout
    header = checkpoint.read_header(f"{out}/last.safetensors")
    assert header["model_config"]["image_size"] == [12, 12]
    assert header["model_config"]["kwargs"]["image_size"] == 12
    train_config = header["training"]["train_config"]
    assert train_config["selective_decay"] is True
    assert train_config["layer_decay"] == 0.75 and train_config["freeze"] == 1
    # the embeddings and the one block were frozen: equal to the initial checkpoint's
    config = presets.ModelConfig.from_json(header["model_config"])
    tuned = checkpoint.load(f"{out}/last.safetensors", *config.build_like()).model
    source_config = presets.ModelConfig.from_json(
        checkpoint.read_header(f"{saved}/last.safetensors")["model_config"]
    )
    source = checkpoint.load(f"{saved}/last.safetensors", *source_config.build_like()).model
    tuned_fc1 = cast(Any, tuned).transformer.layers.blocks.ff.fc1.weight
    np.testing.assert_array_equal(
        tuned_fc1, cast(Any, source).transformer.layers.blocks.ff.fc1.weight
    )
    assert tuned.pos_embedding.shape == (10, 32)  # 3x3 patches and the class token
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", out)
    assert code == 0, err


# --------------------------------------------------------------------------------------
# The digits demo


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location(
        "finetune_digits", ROOT / "benchmarks/finetune_digits.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_digits"] = module
    spec.loader.exec_module(module)
    return module


def test_finetuning_reaches_the_target_in_fewer_steps(demo):
    """ViT (the CLI's default) trained on 0-4 at 16 px, fine-tuned on 5-9 at 24 px, reaches
    0.8 test accuracy in fewer steps than from scratch (about 45 s on 2 cores). Measured:
    0.994 on 0-4 after 150 steps of pre-training; on 5-9, fine-tuned: 0.25 at step 0, over
    0.8 at step 20, 0.92 at step 40; from scratch: 0.20 at step 0, 0.70 at step 40."""
    setup = demo.Setup(pretrain_steps=150, steps=40, eval_every=10, target=0.8)
    result = demo.compare(setup)
    print(demo.table(result))
    assert result["pretrain"]["final_accuracy"] > 0.9
    tuned, scratch = result["finetune"]["steps_to_target"], result["scratch"]["steps_to_target"]
    assert tuned is not None
    assert scratch is None or tuned < scratch
    # and the fine-tuned model is ahead at every evaluation up to its target
    curves = zip(result["finetune"]["curve"][1:], result["scratch"]["curve"][1:], strict=True)
    for (step, acc_ft), (_, acc_sc) in curves:
        if step <= tuned:
            assert acc_ft > acc_sc, step


@pytest.mark.slow  # a full-size ViT-Ti/16: minutes on 2 cores
def test_cli_init_from_timm(capsys, tmp_path, small_npz, monkeypatch):
    """--init timm/<name>: the pretrained model (here timm's architecture with random
    weights, standing in for the download) gets a head for the data's 10 classes and the
    size of --image-size; its checkpoint records the timm name, from which evaluate
    rebuilds it."""
    pytest.importorskip("huggingface_hub")
    from eqx_vision import interop
    from eqx_vision.interop.timm import build

    name = "timm/vit_tiny_patch16_224"

    def pretrained(spec):
        assert spec == name
        config = interop.DataConfig(input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
        return build(spec, key=jax.random.key(5)), config

    monkeypatch.setattr(interop, "pretrained", pretrained)
    out = str(tmp_path / "ft")
    code, stdout, err = run(
        capsys, "train", "--init", name, "--data", small_npz, "--image-size", "32",
        "--epochs", "1", "--batch-size", "32", "--freeze", "12", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "input 3x32x32" in stdout
    header = checkpoint.read_header(f"{out}/last.safetensors")
    assert header["model_config"]["timm"] == name
    assert header["model_config"]["kwargs"]["num_classes"] == 10
    code, _, err = run(capsys, "evaluate", "--checkpoint", out)
    assert code == 0, err

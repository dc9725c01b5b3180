"""Tiny configurations of every public model, for the tests that run across all of them."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax

import eqx_vision as ev


@dataclass(frozen=True)
class Entry:
    cls: Callable[..., Any]
    config: dict[str, Any]
    input_shape: tuple[int, int, int]
    stateful: bool = False
    stochastic: bool = True  # has an active dropout-like layer in training mode
    exact_size: bool = True  # accepts only the built size (else a set of sizes)
    bad_sizes: tuple[tuple[int, int], ...] | None = None  # rejected (height, width)

    def rejected_shapes(self) -> list[tuple[int, ...]]:
        """Inputs the model must reject: a batch, wrong channels, wrong sizes."""
        c, h, w = self.input_shape
        sizes = ((h + 8, w), (h, w + 16)) if self.bad_sizes is None else self.bad_sizes
        return [(1, c, h, w), (c + 1, h, w)] + [(c, bh, bw) for bh, bw in sizes]

    def build(self, key: jax.Array, **overrides: Any) -> tuple[Any, Any]:
        """`(model, state)`; state is None for stateless models."""
        config = {**self.config, **overrides}
        if self.stateful:
            return eqx.nn.make_with_state(self.cls)(**config, key=key)
        return self.cls(**config, key=key), None


VIT = dict(
    image_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=16,
    dim_head=8, dropout=0.1, emb_dropout=0.1,
)  # fmt: skip

NO_DROPOUT = {k: v for k, v in VIT.items() if "dropout" not in k}

ZOO: dict[str, Entry] = {
    "ViT": Entry(ev.ViT, VIT, (3, 16, 16)),
    "SimpleViT": Entry(ev.SimpleViT, NO_DROPOUT, (3, 16, 16), stochastic=False),
    "DeepViT": Entry(ev.DeepViT, VIT, (3, 16, 16)),
    "ParallelViT": Entry(ev.ParallelViT, VIT, (3, 16, 16)),
    "CaiT": Entry(ev.CaiT, {**VIT, "cls_depth": 1, "layer_dropout": 0.1}, (3, 16, 16)),
    "ViTWithPatchMerger": Entry(
        ev.ViTWithPatchMerger,
        {**VIT, "patch_size": 4, "patch_merge_layer": 1, "patch_merge_num_tokens": 4},
        (3, 16, 16),
    ),
    "SmallDatasetViT": Entry(ev.SmallDatasetViT, VIT, (3, 16, 16)),
    "CrossViT": Entry(
        ev.CrossViT,
        dict(
            image_size=16,
            num_classes=5,
            sm_dim=16,
            lg_dim=24,
            sm_patch_size=4,
            lg_patch_size=8,
            sm_enc_depth=1,
            sm_enc_heads=2,
            sm_enc_mlp_dim=16,
            sm_enc_dim_head=8,
            lg_enc_depth=1,
            lg_enc_heads=2,
            lg_enc_mlp_dim=16,
            lg_enc_dim_head=8,
            cross_attn_depth=1,
            cross_attn_heads=2,
            cross_attn_dim_head=8,
            depth=1,
        ),
        (3, 16, 16),
    ),
    "PiT": Entry(
        ev.PiT,
        dict(
            image_size=16,
            patch_size=4,
            num_classes=5,
            dim=8,
            depth=(1, 1),
            heads=2,
            mlp_dim=8,
            dim_head=4,
            dropout=0.1,
            emb_dropout=0.1,
        ),
        (3, 16, 16),
    ),
    "T2TViT": Entry(
        ev.T2TViT,
        dict(
            image_size=16,
            num_classes=5,
            dim=8,
            depth=1,
            heads=2,
            mlp_dim=8,
            dim_head=4,
            t2t_layers=((3, 2), (3, 2)),
            dropout=0.1,
            emb_dropout=0.1,
        ),
        (3, 16, 16),
    ),
    "RegionViT": Entry(
        ev.RegionViT,
        dict(dim=8, depth=1, window_size=2, num_classes=5, attn_dropout=0.1, ff_dropout=0.1),
        (3, 32, 32),
        exact_size=False,
    ),
    "NesT": Entry(
        ev.NesT,
        dict(
            image_size=16,
            patch_size=2,
            num_classes=5,
            dim=8,
            heads=2,
            num_hierarchies=2,
            block_repeats=1,
            dropout=0.1,
        ),
        (3, 16, 16),
    ),
    "TwinsSVT": Entry(
        ev.TwinsSVT,
        dict(
            num_classes=5,
            dropout=0.1,
            **{
                f"s{i}_{n}": v
                for i, row in enumerate(
                    [(8, 2, 2, 2, 1), (16, 2, 2, 2, 0), (16, 2, 2, 2, 1), (24, 1, 5, 2, 1)], 1
                )
                for n, v in zip(
                    ("emb_dim", "patch_size", "local_patch_size", "global_k", "depth"),
                    row,
                    strict=True,
                )
            },
        ),
        (3, 32, 32),
        exact_size=False,
        bad_sizes=((40, 32), (32, 24)),
    ),
    "CrossFormer": Entry(
        ev.CrossFormer,
        dict(
            dim=32,
            depth=(1, 1, 1, 1),
            global_window_size=(4, 2, 2, 1),
            local_window_size=2,
            cross_embed_kernel_sizes=((2, 4), (2,), (2, 4), (2,)),
            cross_embed_strides=2,
            num_classes=5,
            attn_dropout=0.1,
            ff_dropout=0.1,
        ),
        (3, 32, 32),
        exact_size=False,
    ),
    "ScalableViT": Entry(
        ev.ScalableViT,
        dict(
            num_classes=5,
            dim=16,
            depth=(1, 1),
            heads=(2, 1),
            reduction_factor=(2, 1),
            window_size=(4, None),
            ssa_dim_key=8,
            ssa_dim_value=8,
            iwsa_dim_key=8,
            iwsa_dim_value=8,
            ff_expansion_factor=2,
            dropout=0.1,
        ),
        (3, 32, 32),
        exact_size=False,
        bad_sizes=((36, 32), (32, 34)),
    ),
    "CvT": Entry(
        ev.CvT,
        dict(
            num_classes=5,
            s1_emb_dim=8,
            s1_emb_kernel=3,
            s1_emb_stride=2,
            s1_heads=1,
            s1_depth=1,
            s1_mlp_mult=2,
            s2_emb_dim=8,
            s2_heads=1,
            s2_depth=1,
            s2_mlp_mult=2,
            s3_emb_dim=8,
            s3_heads=1,
            s3_depth=1,
            s3_mlp_mult=2,
            dropout=0.1,
        ),
        (3, 16, 16),
        stateful=True,
        exact_size=False,
        bad_sizes=(),
    ),
    "LeViT": Entry(
        ev.LeViT,
        dict(
            image_size=32,
            num_classes=5,
            dim=(8, 12),
            depth=1,
            heads=1,
            mlp_mult=2,
            stages=2,
            dropout=0.1,
        ),
        (3, 32, 32),
        stateful=True,
    ),
}


def call(entry: Entry, model: Any, state: Any, x: jax.Array, key: jax.Array | None = None):
    """Logits of one image, whatever the model's calling convention."""
    if entry.stateful:
        out, _ = model(x, state, key=key)
    else:
        out = model(x, key=key)
    return out[0] if isinstance(out, tuple) else out


def batched(entry: Entry, model: Any, state: Any, x: jax.Array) -> jax.Array:
    if entry.stateful:
        out, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    else:
        out = jax.vmap(model)(x)
    return out[0] if isinstance(out, tuple) else out


def bad_arguments(entry: Entry) -> list[tuple[str, Any]]:
    """Arguments the constructor must reject, each with the others of `entry.config`: a
    float and a bool for every int, a float inside every tuple of ints, rates outside
    [0, 1) for every dropout rate, and an unknown pooling."""
    bad: list[tuple[str, Any]] = []
    for name, value in entry.config.items():
        if "dropout" in name:
            bad += [(name, 1.0), (name, -0.1)]
        elif isinstance(value, int) and not isinstance(value, bool):
            bad += [(name, value + 0.5), (name, True)]
        elif isinstance(value, tuple) and value and all(type(v) is int for v in value):
            bad += [(name, (*value[:-1], value[-1] + 0.5))]
    if "pool" in inspect.signature(entry.cls).parameters:
        bad += [("pool", "max")]
    return bad

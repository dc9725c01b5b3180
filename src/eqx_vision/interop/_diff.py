"""Finding where a port diverges: a torch reference module and an eqx_vision model run on
the same input, compared output by output.

`diff(reference, model, x)` captures the reference's intermediate outputs with forward
hooks and takes the matching outputs of `model.forward_intermediates` (and the embedded
tokens, the final features and the logits where the family has them), then reports the
error of each and the first that exceeds the tolerance.

`RECIPES` says, for each reference class (by its module and name: `"vit_pytorch.vit.ViT"`,
`"timm.models.vision_transformer.VisionTransformer"`), which eqx_vision classes it
converts to and which of its submodules give the outputs matching our intermediate
indices. A new family gets a `Recipe` and a line there; torch is imported only when `diff`
runs.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..models import (
    CaiT,
    CrossFormer,
    CrossViT,
    CvT,
    DeepViT,
    LeViT,
    NesT,
    ParallelViT,
    PiT,
    RegionViT,
    ScalableViT,
    SimpleViT,
    SmallDatasetViT,
    T2TViT,
    TimmCrossViT,
    TimmLeViT,
    TwinsSVT,
    ViT,
    ViTWithPatchMerger,
)


@dataclasses.dataclass(frozen=True)
class Tap:
    """One output of a torch module, captured with a forward hook.

    - `module`: the submodule's name in `named_modules()` (`"transformer.layers.3.1"`).
    - `residual`: capture `output + input`, the residual stream after a branch whose
      module returns the branch only (vit-pytorch's `x = ff(x) + x`).
    - `input`: capture the module's (first) input instead of its output.
    - `item`: the position of the compared tensor in a module output that is a tuple or
      list (one per branch, for instance).
    - `transform`: applied to the captured value before it is compared (to move axes into
      the layout of ours); it keeps the batch axis first.
    - `step`: where the output is computed, when the order of the model's outputs is not
      the order of computation (CrossViT's, branch by branch: `step` is the block): the
      report lists the blocks by `step`, so that the first divergence is the earliest.

    A module that runs several times keeps its last output.
    """

    module: str
    residual: bool = False
    input: bool = False
    item: int | None = None
    transform: Callable[[Any], Any] | None = None
    step: int | None = None

    def describe(self) -> str:
        if self.input:
            return f"{self.module} (input)"
        name = self.module if self.item is None else f"{self.module}[{self.item}]"
        return f"{name} + input" if self.residual else name


Intermediates = Callable[[Any, Any, Any], tuple[Any, list[Any]]]
"""`fn(model, image, state) -> (final features, outputs)` on one image: our side of the
comparison, each output in the reference's layout (without the batch axis)."""


def tokens(model: Any, x: Any, state: Any) -> tuple[Any, list[Any]]:
    """A flat ViT-like model's `forward_intermediates` as token sequences `(seq, dim)`,
    with the prefix tokens first where the model has them (as the reference's residual
    stream holds them)."""
    kwargs: dict[str, Any] = dict(output_fmt="tokens")
    if "prefix_tokens" in inspect.signature(model.forward_intermediates).parameters:
        kwargs["prefix_tokens"] = True
    if state is None:
        final, outputs = model.forward_intermediates(x, **kwargs)
    else:
        (final, outputs), _ = model.forward_intermediates(x, state, **kwargs)
    return final, [
        jnp.concatenate([y[1], y[0]], axis=0) if isinstance(y, tuple) else y for y in outputs
    ]


def maps(model: Any, x: Any, state: Any) -> tuple[Any, list[Any]]:
    """A hierarchical model's `forward_intermediates` as they are: one
    `(channels, height, width)` map per stage."""
    if state is None:
        return model.forward_intermediates(x)
    return model.forward_intermediates(x, state)[0]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the outputs of one reference class line up with an eqx_vision model's.

    - `models`: the eqx_vision classes that this reference converts to.
    - `blocks`: `blocks(reference)`, one `Tap` per output of the model's
      `forward_intermediates` (per entry of its `feature_info`), in order.
    - `intermediates`: our side (see `Intermediates`).
    - `embed`: the tap of the tokens the first block takes, and our function
      `embed(model, image)` giving them; `None` to leave that row out.
    - `features`: the tap equal to our `forward_features` (the final features, compared
      with `intermediates`' first result); `None` to leave that row out.
    - `logits`: `logits(reference)`, whether the reference's output is comparable with
      `model(x)` (vit-pytorch's ViT without a head returns its tokens, ours the pooled
      features).
    """

    models: tuple[type, ...]
    blocks: Callable[[Any], Sequence[Tap]]
    intermediates: Intermediates = tokens
    embed: tuple[Tap, Callable[[Any, Any], Any]] | None = None
    features: Tap | None = None
    logits: Callable[[Any], bool] = lambda _reference: True


def residual_blocks(
    layers: str, branch: int = 1, *, residual: bool = True
) -> Callable[[Any], list[Tap]]:
    """The output of submodule `branch` of each block under `layers`. By default the
    residual stream after each block of a vit-pytorch transformer whose blocks are
    `ModuleList`s `[attn, ff]` (`"transformer.layers"`), run as `x = attn(x) + x;
    x = ff(x) + x`: the output plus the input of `ff`. Without `residual`, the submodule's
    output itself (CrossFormer's stages `[embedding, transformer]`)."""

    def blocks(reference: Any) -> list[Tap]:
        count = len(reference.get_submodule(layers))
        return [Tap(f"{layers}.{i}.{branch}", residual=residual) for i in range(count)]

    return blocks


def module_blocks(layers: str) -> Callable[[Any], list[Tap]]:
    """The output of each module of the `ModuleList` or `Sequential` `layers` (timm's
    `"blocks"`, whose blocks return the residual stream themselves)."""

    def blocks(reference: Any) -> list[Tap]:
        return [Tap(f"{layers}.{i}") for i in range(len(reference.get_submodule(layers)))]

    return blocks


def embed_method(model: Any, x: Any) -> Any:
    """The model's `embed(x)`: the tokens its first block takes."""
    return model.embed(x)


def _has_head(reference: Any) -> bool:
    return getattr(reference, "mlp_head", None) is not None


def vit_pytorch_transformer(
    *models: type, features: bool = True, logits: Callable[[Any], bool] = _has_head
) -> Recipe:
    """The recipe of a vit-pytorch ViT-like model: the embedded tokens are the input of
    its `transformer`, the blocks `transformer.layers`, the final features (with
    `features`) the transformer's output."""
    return Recipe(
        models=models,
        blocks=residual_blocks("transformer.layers"),
        embed=(Tap("transformer", input=True), embed_method),
        features=Tap("transformer") if features else None,
        logits=logits,
    )


def timm_vision_transformer(*models: type) -> Recipe:
    """The recipe of timm's `VisionTransformer` and its subclasses: the embedded tokens
    are the input of `blocks`, the final features the output of `norm`."""
    return Recipe(
        models=models,
        blocks=module_blocks("blocks"),
        embed=(Tap("blocks", input=True), embed_method),
        features=Tap("norm"),
    )


def branch_blocks(layers: str, branch: int | None, branches: int = 2) -> Callable[[Any], list[Tap]]:
    """The outputs of multi-branch blocks (CrossViT) ordered by branch, then block: each
    module of `layers` (its submodule `branch`, if not `None`) returns one token sequence
    per branch."""

    def blocks(reference: Any) -> list[Tap]:
        count = len(reference.get_submodule(layers))
        suffix = "" if branch is None else f".{branch}"
        return [
            Tap(f"{layers}.{i}{suffix}", item=b, step=i)
            for b in range(branches)
            for i in range(count)
        ]

    return blocks


def _patch_merger_blocks(reference: Any) -> list[Tap]:
    """vit-pytorch's ViT with a patch merger: the blocks before the merger (ours stop
    there; the blocks after it see the merged tokens)."""
    count = reference.transformer.patch_merge_layer_index + 1
    return residual_blocks("transformer.layers")(reference)[:count]


def _unblock(block: int) -> Callable[[Any], Any]:
    """vit-pytorch NesT's blocked layout `(b b1 b2) c h w` back to `b c (b1 h) (b2 w)`."""

    def transform(t: Any) -> Any:
        n, (c, h, w) = t.shape[0] // block**2, t.shape[1:]
        t = t.reshape(n, block, block, c, h, w).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(n, c, block * h, block * w)

    return transform


def _nest_blocks(reference: Any) -> list[Tap]:
    """vit-pytorch NesT: each level's `Transformer` (on the blocked layout, put back on
    the map), before its aggregation."""
    levels = len(reference.layers)
    return [Tap(f"layers.{i}.0", transform=_unblock(2 ** (levels - 1 - i))) for i in range(levels)]


def _twins_stages(reference: Any) -> list[Tap]:
    """vit-pytorch's TwinsSVT: its `layers` are the stages, then the pooling, a rearrange
    and the classifier."""
    return [Tap(f"layers.{i}") for i in range(len(reference.layers) - 3)]


def _twins_stage_ends(reference: Any) -> list[Tap]:
    """timm's Twins: the tokens after the last block of each stage."""
    return [Tap(f"blocks.{i}.{len(stage) - 1}") for i, stage in enumerate(reference.blocks)]


def _pit_stages(reference: Any) -> list[Tap]:
    """vit-pytorch's PiT: its `layers` alternate the stages' transformers and the poolings."""
    return [Tap(f"layers.{i}") for i in range(0, len(reference.layers), 2)]


def _timm_pit_tokens(out: Any) -> Any:
    """timm PiT's stage output `(map, class tokens)` as tokens, class tokens first."""
    x, cls_tokens = out
    import torch

    return torch.cat([cls_tokens, x.flatten(2).transpose(1, 2)], dim=1)


def _timm_pit_stages(reference: Any) -> list[Tap]:
    """timm's PiT: each of its `transformers` (a stage, with the pooling before it)."""
    return [
        Tap(f"transformers.{i}", transform=_timm_pit_tokens)
        for i in range(len(reference.transformers))
    ]


def _t2t_blocks(reference: Any) -> list[Tap]:
    """vit-pytorch's T2TViT: the tokens-to-token transformers in `to_patch_embedding`, then
    the residual stream after each block of the main transformer."""
    soft = [
        Tap(f"to_patch_embedding.{i}")
        for i, module in enumerate(reference.to_patch_embedding)
        if type(module).__name__ == "Transformer"
    ]
    return soft + residual_blocks("transformer.layers")(reference)


def _regionvit_stages(reference: Any) -> list[Tap]:
    """vit-pytorch's RegionViT: the local tokens' map out of each stage's R2L transformer
    (the third module of each stage; it returns `(local, region)`)."""
    return [Tap(f"layers.{i}.2", item=0) for i in range(len(reference.layers))]


def _levit_stages(reference: Any) -> list[Tap]:
    """vit-pytorch's LeViT: its `backbone` alternates the stages and the downsamplings."""
    return [Tap(f"backbone.{i}") for i in range(0, len(reference.backbone), 2)]


def _as_tokens(t: Any) -> Any:
    """A `(batch, channels, h, w)` map as tokens `(batch, h * w, channels)`; tokens as
    they are."""
    return t.flatten(2).transpose(1, 2) if t.ndim == 4 else t


def _timm_levit_stages(reference: Any) -> list[Tap]:
    """timm's LeViT: each of its `stages` (tokens, or maps with `use_conv`)."""
    return [Tap(f"stages.{i}", transform=_as_tokens) for i in range(len(reference.stages))]


def _channels_first(t: Any) -> Any:
    return t.permute(0, 3, 1, 2)


def _always(_reference: Any) -> bool:
    return True


RECIPES: dict[str, Recipe] = {
    # vit-pytorch
    "vit_pytorch.vit.ViT": vit_pytorch_transformer(ViT),
    "vit_pytorch.simple_vit.SimpleViT": vit_pytorch_transformer(SimpleViT, logits=_always),
    "vit_pytorch.deepvit.DeepViT": vit_pytorch_transformer(DeepViT),
    "vit_pytorch.parallel_vit.ViT": vit_pytorch_transformer(ParallelViT),
    "vit_pytorch.vit_for_small_dataset.ViT": vit_pytorch_transformer(SmallDatasetViT),
    "vit_pytorch.vit_with_patch_merger.ViT": Recipe(
        models=(ViTWithPatchMerger,),
        blocks=_patch_merger_blocks,
        embed=(Tap("transformer", input=True), embed_method),
        features=Tap("transformer"),
    ),
    "vit_pytorch.cait.CaiT": Recipe(
        models=(CaiT,),
        blocks=residual_blocks("patch_transformer.layers"),
        embed=(Tap("patch_transformer", input=True), embed_method),
    ),
    "vit_pytorch.t2t.T2TViT": Recipe(
        models=(T2TViT,), blocks=_t2t_blocks, features=Tap("transformer")
    ),
    "vit_pytorch.pit.PiT": Recipe(models=(PiT,), blocks=_pit_stages, features=Tap("layers")),
    "vit_pytorch.regionvit.RegionViT": Recipe(
        models=(RegionViT,), blocks=_regionvit_stages, intermediates=maps
    ),
    "vit_pytorch.levit.LeViT": Recipe(
        models=(LeViT,), blocks=_levit_stages, intermediates=maps, features=Tap("backbone")
    ),
    "vit_pytorch.cvt.CvT": Recipe(
        models=(CvT,), blocks=module_blocks("layers"), intermediates=maps, features=Tap("layers")
    ),
    "vit_pytorch.crossformer.CrossFormer": Recipe(
        models=(CrossFormer,),
        blocks=residual_blocks("layers", 1, residual=False),
        intermediates=maps,
    ),
    "vit_pytorch.cross_vit.CrossViT": Recipe(
        models=(CrossViT,), blocks=branch_blocks("multi_scale_encoder.layers", 2)
    ),
    "vit_pytorch.nest.NesT": Recipe(
        models=(NesT,), blocks=_nest_blocks, intermediates=maps, features=Tap("mlp_head.0")
    ),
    "vit_pytorch.twins_svt.TwinsSVT": Recipe(
        models=(TwinsSVT,), blocks=_twins_stages, intermediates=maps
    ),
    "vit_pytorch.scalable_vit.ScalableViT": Recipe(
        models=(ScalableViT,),
        blocks=residual_blocks("layers", 0, residual=False),
        intermediates=maps,
    ),
    # timm
    "timm.models.vision_transformer.VisionTransformer": timm_vision_transformer(ViT),
    "timm.models.deit.VisionTransformerDistilled": timm_vision_transformer(ViT),
    "timm.models.cait.Cait": timm_vision_transformer(CaiT),
    "timm.models.crossvit.CrossVit": Recipe(
        models=(TimmCrossViT,), blocks=branch_blocks("blocks", None)
    ),
    "timm.models.pit.PoolingVisionTransformer": Recipe(models=(PiT,), blocks=_timm_pit_stages),
    "timm.models.levit.Levit": Recipe(models=(TimmLeViT,), blocks=_timm_levit_stages),
    "timm.models.levit.LevitDistilled": Recipe(models=(TimmLeViT,), blocks=_timm_levit_stages),
    "timm.models.nest.Nest": Recipe(
        models=(NesT,),
        blocks=module_blocks("levels"),
        intermediates=maps,
        features=Tap("norm", transform=_channels_first),
    ),
    "timm.models.twins.Twins": Recipe(models=(TwinsSVT,), blocks=_twins_stage_ends),
}
"""The recipe of each supported reference class, by its module and name
(`"vit_pytorch.vit.ViT"`; vit-pytorch has several classes named `ViT`)."""


def reference_name(reference: Any) -> str:
    """The module and name of a torch module's class: its key in `RECIPES`."""
    cls = type(reference)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared output.

    - `name`: ours: `"embed"`, the `feature_info` name of a block or stage
      (`"transformer.layers[3]"`), `"features"` (`forward_features`) or `"output"` (the
      model's output, the logits).
    - `reference`: the torch submodule it was captured from.
    - `index`: the `forward_intermediates` index, `None` for the other rows.
    - `shape`: the compared shape, the batch axis first.
    - `max_abs`: the largest absolute difference.
    - `rel`: `max_abs` over the largest absolute value of the reference's output.
    - `ok`: `rel <= tol`.
    """

    name: str
    reference: str
    index: int | None
    shape: tuple[int, ...]
    max_abs: float
    rel: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of [`diff`][eqx_vision.interop.diff]: one `Row` per compared output, in
    the order the model computes them (the blocks in the order of `feature_info`, or of
    their `Tap.step` where the recipe gives one). `str(report)` is a table."""

    model: str
    reference: str
    tol: float
    rows: tuple[Row, ...]

    @property
    def first_divergence(self) -> Row | None:
        """The first row whose relative error exceeds `tol`, or `None`."""
        return next((row for row in self.rows if not row.ok), None)

    @property
    def ok(self) -> bool:
        """Whether every output agrees within `tol`."""
        return self.first_divergence is None

    def __str__(self) -> str:
        header = ("output", "reference", "shape", "max abs", "relative", "")
        lines = [
            (
                row.name,
                row.reference,
                "x".join(map(str, row.shape)),
                f"{row.max_abs:.2e}",
                f"{row.rel:.2e}",
                "ok" if row.ok else "DIVERGES",
            )
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

        def fmt(line: Sequence[str]) -> str:
            return "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()

        first = self.first_divergence
        verdict = (
            f"all {len(self.rows)} outputs agree"
            if first is None
            else f"first divergence: {first.name} (from {first.reference}), relative error "
            f"{first.rel:.2e}"
        )
        title = f"{self.model} against {self.reference}, tolerance {self.tol:.1e} (relative)"
        return "\n".join([title, fmt(header), *map(fmt, lines), verdict])


def _as_batch(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim == 3:
        return array[None]
    if array.ndim != 4:
        raise ValueError(
            f"diff: x must be one image (channels, height, width) or a batch (batch, channels, "
            f"height, width); got shape {array.shape}."
        )
    return array


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.array(value, dtype=np.float32)


def _run_reference(
    reference: Any, taps: Sequence[Tap], x: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    import torch

    named = dict(reference.named_modules())
    captured: dict[int, Any] = {}
    handles = []
    training = reference.training
    try:
        for i, tap in enumerate(taps):
            if tap.module not in named:
                raise ValueError(
                    f"diff: {type(reference).__name__} has no submodule {tap.module!r}."
                )

            def hook(_module: Any, inputs: Any, output: Any, i: int = i, tap: Tap = tap) -> None:
                value = inputs[0] if tap.input else output
                if tap.item is not None:
                    value = value[tap.item]
                if tap.residual:
                    value = value + inputs[0]
                # converted (copied) at once: a later in-place operation must not change it
                captured[i] = _to_numpy(value if tap.transform is None else tap.transform(value))

            handles.append(named[tap.module].register_forward_hook(hook))
        reference.eval()
        dtype = next(reference.parameters()).dtype
        with torch.no_grad():
            out = reference(torch.from_numpy(x).to(dtype))
    finally:
        for handle in handles:
            handle.remove()
        reference.train(training)
    missing = [taps[i].module for i in range(len(taps)) if i not in captured]
    if missing:
        raise ValueError(
            f"diff: the submodules {missing} of {type(reference).__name__} did not run."
        )
    return [captured[i] for i in range(len(taps))], _to_numpy(out)


def _run_model(
    recipe: Recipe, model: Any, x: np.ndarray, state: Any
) -> tuple[Any, Any, list[Any], Any]:
    def run(model: Any, image: Any, state: Any) -> tuple[Any, Any, list[Any], Any]:
        embedded = None if recipe.embed is None else recipe.embed[1](model, image)
        final, outputs = recipe.intermediates(model, image, state)
        out = model(image) if state is None else model(image, state)[0]
        return embedded, final, list(outputs), out

    batched = eqx.filter_vmap(run, in_axes=(None, 0, None))
    return eqx.filter_jit(batched)(model, jnp.asarray(x), state)


def _row(name: str, tap: str, index: int | None, ours: Any, theirs: np.ndarray, tol: float) -> Row:
    a = np.asarray(ours, dtype=np.float64)
    e = np.asarray(theirs, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(
            f"diff: {name} has shape {a.shape} in the model but {e.shape} in the reference "
            f"({tap}); the model and the reference are not built alike."
        )
    max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    rel = max_abs / max(scale, 1e-12) if max_abs else 0.0
    ok = bool(rel <= tol) and not math.isnan(rel)
    return Row(name, tap, index, tuple(int(s) for s in a.shape), max_abs, rel, ok)


def diff(
    reference: Any,
    model: Any,
    x: Any,
    *,
    state: Any = None,
    tol: float = 1e-4,
) -> Report:
    """Run a vit-pytorch or timm module and an eqx_vision model on the same input and
    compare their outputs block by block, to find where a port goes wrong.

    The reference's outputs are captured with forward hooks (in eval mode, without
    gradients; its mode is restored afterwards); ours are those of
    `model.forward_intermediates` (in inference mode), one per entry of
    `model.feature_info`. Where the family has them, the embedded tokens before the first
    block, the final features (`forward_features`) and the output (the logits) are compared
    too. Which submodule matches which output is looked up in `RECIPES` by the reference's
    class.

    **Arguments:**

    - `reference`: the torch module (`vit_pytorch.vit.ViT`, `timm`'s `VisionTransformer`,
      ... ; see `RECIPES`).
    - `model`: the eqx_vision model it was ported to (e.g. with `from_vit_pytorch` or
      `from_timm`).
    - `x`: one image `(channels, height, width)` or a batch `(batch, channels, height,
      width)`, as a NumPy, JAX or torch array.
    - `state`: the model's `eqx.nn.State`, for a model with one.
    - `tol`: the largest relative error (the largest absolute difference over the largest
      absolute value of the reference's output) that counts as agreeing.

    **Returns:** a [`Report`][eqx_vision.interop.Report]: `report.first_divergence` is the
    first output that differs by more than `tol` (`None` if none does), `print(report)`
    shows the table.

    **Raises:** `TypeError` for a reference class that has no recipe (naming the supported
    ones) or a model of another class than the reference converts to; `ValueError` for an
    input that is not an image or a batch of them, or for a model whose outputs do not
    have the reference's number or shapes (built with another configuration).
    """
    name = reference_name(reference)
    recipe = RECIPES.get(name)
    if recipe is None:
        known = ", ".join(sorted(RECIPES))
        raise TypeError(f"diff: no recipe for the reference class {name}; supported: {known}.")
    if not isinstance(model, recipe.models):
        expected = " or ".join(cls.__name__ for cls in recipe.models)
        raise TypeError(
            f"diff: a {name} reference compares with an eqx_vision {expected}; got "
            f"{type(model).__name__}."
        )
    if not (isinstance(tol, float | int) and tol >= 0):
        raise ValueError(f"diff: tol must be a number >= 0; got {tol!r}.")
    batch = _as_batch(x)
    taps = list(recipe.blocks(reference))
    info = model.feature_info
    if len(taps) != len(info):
        raise ValueError(
            f"diff: the reference {type(reference).__name__} has {len(taps)} blocks to compare "
            f"but the model's forward_intermediates has {len(info)} outputs; the model and the "
            "reference are not built alike."
        )
    extra = [t for t in (recipe.embed and recipe.embed[0], recipe.features) if t is not None]
    embedded, final, outputs, out = _run_model(recipe, eqx.nn.inference_mode(model), batch, state)
    captured, expected_out = _run_reference(reference, [*taps, *extra], batch)
    theirs = iter(captured[len(taps) :])

    rows = []
    if recipe.embed is not None:
        rows.append(_row("embed", recipe.embed[0].describe(), None, embedded, next(theirs), tol))
    for entry, tap, ours, theirs_block in zip(
        info, taps, outputs, captured[: len(taps)], strict=True
    ):
        rows.append(_row(entry.name, tap.describe(), entry.index, ours, theirs_block, tol))
    if recipe.features is not None:
        rows.append(_row("features", recipe.features.describe(), None, final, next(theirs), tol))
    if recipe.logits(reference):
        rows.append(_row("output", "output", None, out, expected_out, tol))
    return Report(type(model).__name__, name, float(tol), tuple(rows))

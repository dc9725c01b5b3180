"""Loading vit-pytorch `state_dict()`s into eqx_vision models.

`.._state_dict` holds the reader (`StateDict`) and the converters of the shared layers;
each module here holds the converters of one architecture or family. `CONVERTERS` is the
table that `from_vit_pytorch` dispatches through: a new architecture gets its converter
module and a line here, and its model file never imports this package.
"""

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax

from ...layers import is_stateful
from ...models import (
    LSA,
    SPT,
    CaiT,
    CrossFormer,
    CrossViT,
    CvT,
    DeepViT,
    LeViT,
    NesT,
    ParallelViT,
    PatchMerger,
    PiT,
    RegionViT,
    ScalableViT,
    SimpleViT,
    SmallDatasetViT,
    T2TViT,
    TwinsSVT,
    ViT,
    ViTWithPatchMerger,
)
from .._state_dict import CheckpointError as CheckpointError, StateDict as StateDict
from . import (
    cait,
    cross_vit,
    crossformer,
    cvt,
    levit,
    nest,
    pit,
    regionvit,
    scalable_vit,
    t2t,
    twins_svt,
    vit,
)


Converter = Callable[..., Any]
"""`converter(model, sd) -> model`, or `converter(model, sd, state) -> (model, state)` for
the models that keep BatchNorm statistics in an `eqx.nn.State`."""

CONVERTERS: Mapping[type[eqx.Module], Converter] = {
    CaiT: cait.convert_cait,
    CrossFormer: crossformer.convert_crossformer,
    CrossViT: cross_vit.convert_cross_vit,
    CvT: cvt.convert_cvt,
    DeepViT: vit.convert_deepvit,
    LSA: vit.convert_lsa,
    LeViT: levit.convert_levit,
    NesT: nest.convert_nest,
    ParallelViT: vit.convert_parallel_vit,
    PatchMerger: vit.convert_patch_merger,
    PiT: pit.convert_pit,
    RegionViT: regionvit.convert_regionvit,
    SPT: vit.convert_spt,
    ScalableViT: scalable_vit.convert_scalable_vit,
    SimpleViT: vit.convert_simple_vit,
    SmallDatasetViT: vit.convert_small_dataset_vit,
    T2TViT: t2t.convert_t2t_vit,
    TwinsSVT: twins_svt.convert_twins_svt,
    ViT: vit.convert_vit,
    ViTWithPatchMerger: vit.convert_vit_with_patch_merger,
}
"""The vit-pytorch converter of every model class that has one, by exact class."""


def from_vit_pytorch(model: eqx.Module, state_dict: Mapping[str, Any], *, state: Any = None) -> Any:
    """Load the weights of a vit-pytorch module into an eqx_vision model of the same role.

    **Arguments:**

    - `model`: an eqx_vision model built with the same configuration as the torch module
      (`ev.ViT(...)` for `vit_pytorch.vit.ViT(...)`, and so on).
    - `state_dict`: a mapping of names to arrays: `torch_module.state_dict()`, or the same
      with NumPy arrays. torch is not needed to call this function.
    - `state`: the model's `eqx.nn.State`, if it was built with
      `eqx.nn.make_with_state`. Required for models with BatchNorm (CvT, LeViT): their
      running statistics are loaded into it. A stateless model's (empty) state is returned
      as given.

    **Returns:**

    A new model with the loaded weights, or `(model, state)` when `state` is given.

    **Raises:**

    `CheckpointError` (a `ValueError`) on a missing, unexpected or mis-shaped tensor,
    naming the key and both shapes, or on an integer tensor where the model has a
    floating-point one (or the reverse; floating-point tensors of another precision, such
    as float16 or bfloat16, are converted to the model's dtype). Nothing is modified when
    it raises. `TypeError` for a model of a class that has no vit-pytorch counterpart,
    naming the supported ones; `ValueError` for a model with BatchNorm given no `state`.
    """
    converter = CONVERTERS.get(type(model))
    if converter is None:
        known = ", ".join(sorted(c.__name__ for c in CONVERTERS))
        raise TypeError(
            f"no vit-pytorch converter for {type(model).__name__}; known models: {known}."
        )
    name = type(model).__name__
    if state is not None and not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"state must be the eqx.nn.State of the model (from eqx.nn.make_with_state); got "
            f"{type(state).__name__}."
        )
    stateful = is_stateful(model)
    if stateful and state is None:
        raise ValueError(
            f"{name} keeps BatchNorm statistics in an eqx.nn.State: build it with "
            f"`model, state = eqx.nn.make_with_state(ev.{name})(...)` and pass "
            "`from_vit_pytorch(model, state_dict, state=state)`, which returns (model, state)."
        )
    sd = StateDict(state_dict)
    if not stateful:
        # A stateless model built with `eqx.nn.make_with_state` has an empty state: it is
        # returned as given, so that one call serves every model.
        model = converter(model, sd)
        sd.finish()
        return model if state is None else (model, state)
    # A copy: `State.set` retires the object it is called on, and a failed load must
    # leave the caller's state usable.
    out = converter(model, sd, jax.tree.map(lambda a: a, state))
    sd.finish()
    return out

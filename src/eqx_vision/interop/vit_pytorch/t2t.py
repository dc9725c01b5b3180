"""vit-pytorch converter of T2T-ViT."""

import equinox as eqx

from ...layers import Transformer
from ...models.t2t import T2TViT
from .._state_dict import (
    CheckpointError,
    StateDict,
    convert_linear,
    convert_transformer,
    required,
)


def convert_t2t_vit(model: T2TViT, sd: StateDict) -> T2TViT:
    """The weights of a `vit_pytorch.t2t.T2TViT` state dict."""
    if not isinstance(model.transformer, Transformer):
        raise CheckpointError(
            "from_vit_pytorch loads a T2TViT only with its own main transformer (or an "
            "eqx_vision.layers.Transformer passed as transformer=); this one has a "
            f"{type(model.transformer).__name__}."
        )
    # `to_patch_embedding` is an nn.Sequential of four modules per stage (rearrange, unfold,
    # rearrange, transformer), then the Linear.
    t2t = tuple(
        convert_transformer(t, sd, f"to_patch_embedding.{4 * i + 3}.")
        for i, t in enumerate(model.t2t_transformers)
    )
    linear_index = 4 * len(model.t2t_layers)
    return eqx.tree_at(
        lambda m: (
            m.t2t_transformers,
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.mlp_head,
        ),
        model,
        (
            t2t,
            convert_linear(model.to_patch_embedding, sd, f"to_patch_embedding.{linear_index}."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            convert_transformer(model.transformer, sd, "transformer."),
            convert_linear(required(model.mlp_head, "the classifier"), sd, "mlp_head."),
        ),
    )

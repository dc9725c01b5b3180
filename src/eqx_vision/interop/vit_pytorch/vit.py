"""vit-pytorch converters of the plain ViT family: ViT, SimpleViT, DeepViT, ParallelViT,
the ViT for small datasets (with its SPT and LSA) and the ViT with a PatchMerger."""

from collections.abc import Callable
from typing import TypeVar

import equinox as eqx

from ...layers import Parallel, TransformerBlock
from ...models.deepvit import DeepViT
from ...models.parallel_vit import ParallelViT
from ...models.patch_merger import PatchMerger, ViTWithPatchMerger
from ...models.simple_vit import SimpleViT
from ...models.small_dataset_vit import LSA, SPT, SmallDatasetViT
from ...models.vit import ViT
from .._state_dict import (
    StateDict,
    convert_attention,
    convert_block,
    convert_feedforward,
    convert_head,
    convert_layernorm,
    convert_linear,
    convert_parallel,
    convert_patch_embedding,
    convert_stack,
    convert_transformer,
)


def convert_vit(model: ViT, sd: StateDict) -> ViT:
    """The weights of a `vit_pytorch.vit.ViT` state dict."""
    head = None if model.mlp_head is None else convert_linear(model.mlp_head, sd, "mlp_head.")
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token),
            sd.take("pos_embedding", model.pos_embedding),
            convert_transformer(model.transformer, sd, "transformer."),
            head,
        ),
        is_leaf=lambda x: x is None,
    )


def _simple_vit_block(m: TransformerBlock, sd: StateDict, prefix: str) -> TransformerBlock:
    return convert_block(
        m,
        sd,
        prefix,
        attn=lambda a, sd, p: convert_attention(a, sd, p, out="to_out."),
        ff=lambda f, sd, p: convert_feedforward(f, sd, p, indices=(0, 1, 3)),
    )


def convert_simple_vit(model: SimpleViT, sd: StateDict) -> SimpleViT:
    """The weights of a `vit_pytorch.simple_vit.SimpleViT` state dict."""
    return eqx.tree_at(
        lambda m: (m.to_patch_embedding, m.transformer, m.linear_head),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            convert_transformer(model.transformer, sd, "transformer.", block=_simple_vit_block),
            convert_head(model.linear_head, sd, "linear_head."),
        ),
    )


def convert_deepvit(model: DeepViT, sd: StateDict) -> DeepViT:
    """The weights of a `vit_pytorch.deepvit.DeepViT` state dict."""
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            convert_transformer(model.transformer, sd, "transformer."),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_head(model.mlp_head, sd, "mlp_head.1."),
        ),
    )


B = TypeVar("B", bound=eqx.Module)


def _convert_branches(
    m: B | Parallel[B], sd: StateDict, prefix: str, convert: Callable[[B, StateDict, str], B]
) -> B | Parallel[B]:
    """Branches stored as `{prefix}fns.{b}.`; a single branch is a plain module here."""
    if isinstance(m, Parallel):
        return convert_parallel(m, sd, prefix, convert)
    return convert(m, sd, prefix + "fns.0.")


def _parallel_block(m: TransformerBlock, sd: StateDict, prefix: str) -> TransformerBlock:
    return convert_block(
        m,
        sd,
        prefix,
        attn=lambda a, sd, p: _convert_branches(a, sd, p, convert_attention),
        ff=lambda f, sd, p: _convert_branches(f, sd, p, convert_feedforward),
    )


def convert_parallel_vit(model: ParallelViT, sd: StateDict) -> ParallelViT:
    """The weights of a `vit_pytorch.parallel_vit.ViT` state dict."""
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, *model.cls_token.shape)),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            convert_transformer(model.transformer, sd, "transformer.", block=_parallel_block),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_head(model.mlp_head, sd, "mlp_head.1."),
        ),
    )


def _spt(m: SPT, sd: StateDict, prefix: str) -> SPT:
    """vit-pytorch's `SPT`: `LayerNorm` and `Linear` at `{prefix}to_patch_tokens.{1,2}.`."""
    return eqx.tree_at(
        lambda s: s.to_patch_tokens,
        m,
        convert_patch_embedding(m.to_patch_tokens, sd, prefix + "to_patch_tokens."),
    )


def convert_lsa(model: LSA, sd: StateDict) -> LSA:
    """The weights of a `vit_pytorch.vit_for_small_dataset.LSA` state dict."""
    out = convert_attention(model, sd, "")
    assert isinstance(out, LSA)
    return out


def convert_spt(model: SPT, sd: StateDict) -> SPT:
    """The weights of a `vit_pytorch.vit_for_small_dataset.SPT` state dict."""
    return _spt(model, sd, "")


def convert_small_dataset_vit(model: SmallDatasetViT, sd: StateDict) -> SmallDatasetViT:
    """The weights of a `vit_pytorch.vit_for_small_dataset.ViT` state dict."""
    seq, dim = model.pos_embedding.shape
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.cls_token,
            m.pos_embedding,
            m.transformer,
            m.head_norm,
            m.mlp_head,
        ),
        model,
        (
            _spt(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take("cls_token", model.cls_token, torch_shape=(1, 1, dim)),
            sd.take("pos_embedding", model.pos_embedding, torch_shape=(1, seq, dim)),
            convert_transformer(model.transformer, sd, "transformer."),
            convert_layernorm(model.head_norm, sd, "mlp_head.0."),
            convert_head(model.mlp_head, sd, "mlp_head.1."),
        ),
    )


def _patch_merger(m: PatchMerger, sd: StateDict, prefix: str) -> PatchMerger:
    """vit-pytorch's `PatchMerger`: `{prefix}norm.*` and `{prefix}queries`."""
    return eqx.tree_at(
        lambda p: (p.norm, p.queries),
        m,
        (convert_layernorm(m.norm, sd, prefix + "norm."), sd.take(prefix + "queries", m.queries)),
    )


def convert_patch_merger(model: PatchMerger, sd: StateDict) -> PatchMerger:
    """The weights of a `vit_pytorch.vit_with_patch_merger.PatchMerger` state dict."""
    return _patch_merger(model, sd, "")


def convert_vit_with_patch_merger(model: ViTWithPatchMerger, sd: StateDict) -> ViTWithPatchMerger:
    """The weights of a `vit_pytorch.vit_with_patch_merger.ViT` state dict."""
    # The reference numbers the blocks of its single encoder 0 … depth-1 on both sides of
    # the merger.
    offset = model.patch_merge_layer
    before = eqx.tree_at(
        lambda t: t.layers,
        model.transformer,
        convert_stack(
            model.transformer.layers, sd, lambda i: f"transformer.layers.{i}.", convert_block
        ),
    )
    after = model.merged_transformer
    if after is not None:
        after = eqx.tree_at(
            lambda t: t.layers,
            after,
            convert_stack(
                after.layers, sd, lambda i: f"transformer.layers.{i + offset}.", convert_block
            ),
        )
    return eqx.tree_at(
        lambda m: (
            m.to_patch_embedding,
            m.pos_embedding,
            m.transformer,
            m.patch_merger,
            m.merged_transformer,
            m.norm,
            m.mlp_head,
        ),
        model,
        (
            convert_patch_embedding(model.to_patch_embedding, sd, "to_patch_embedding."),
            sd.take(
                "pos_embedding", model.pos_embedding, torch_shape=(1, *model.pos_embedding.shape)
            ),
            before,
            _patch_merger(model.patch_merger, sd, "transformer.patch_merger."),
            after,
            convert_layernorm(model.norm, sd, "transformer.norm."),
            convert_head(model.mlp_head, sd, "mlp_head.1."),
        ),
        is_leaf=lambda x: x is None,
    )

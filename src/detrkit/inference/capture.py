"""Recording what happens inside a model's forward pass, without changing the model.

:func:`capture_internals` registers forward hooks for the length of a ``with`` block:

- DETR (and Deformable DETR's decoder self-attention): every ``nn.MultiheadAttention`` is asked for
  its per-head weights (a pre-hook sets ``need_weights=True, average_attn_weights=False``; the
  output is the same up to float rounding: PyTorch then skips its fused inference kernel).
- Deformable DETR: every multi-scale deformable attention records its query, reference points,
  sampling locations and attention weights, with the levels' ``spatial_shapes`` and
  ``level_start_index``. The locations and weights come from ``MSDeformAttn.sampling``, the method
  the attention's own forward uses, re-run on the recorded inputs (two small Linear layers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from detrkit.models import kind_of
from detrkit.models.deformable_attention import MSDeformAttn


@dataclass
class AttentionRecord:
    """The weights of one ``nn.MultiheadAttention`` call."""

    name: str  # the module's name in the model, e.g. "transformer.encoder.layers.0.self_attn"
    weights: Tensor  # [B, M, Lq, Lk] per head; each row sums to 1 over the keys


@dataclass
class SamplingRecord:
    """Where one multi-scale deformable attention call sampled, and with what weights."""

    name: str
    query: Tensor  # [B, Lq, C] with its position added: offsets and weights are Linear maps of it
    reference_points: Tensor  # [B, Lq, L, 2] normalised (x, y) per level, or [B, Lq, L, 4] boxes
    sampling_locations: Tensor  # [B, Lq, M, L, P, 2] normalised (x, y) on each level
    attention_weights: Tensor  # [B, Lq, M, L, P]; sum to 1 over L x P per query and head
    spatial_shapes: Tensor  # [L, 2] (H, W) of each level
    level_start_index: Tensor  # [L] where each level starts in the flattened sequence


@dataclass
class Internals:
    """What :func:`capture_internals` recorded, layer by layer (first layer first)."""

    model_type: str
    # DETR: the encoder's self-attention over the feature map's H*W positions.
    encoder_attention: list[AttentionRecord] = field(default_factory=list)
    # Both models: the object queries' self-attention.
    decoder_self_attention: list[AttentionRecord] = field(default_factory=list)
    # DETR: the object queries' attention over the H*W positions.
    decoder_cross_attention: list[AttentionRecord] = field(default_factory=list)
    # DETR: (H, W) of the feature map the transformer attends to.
    feature_shape: tuple[int, int] | None = None
    # DETR: [B, H*W], True on padding.
    padding_mask: Tensor | None = None
    # Deformable DETR: the encoder's and the decoder's deformable attention.
    encoder_sampling: list[SamplingRecord] = field(default_factory=list)
    decoder_sampling: list[SamplingRecord] = field(default_factory=list)
    # Deformable DETR: [B, L, 2] the unpadded fraction (w, h) of each level.
    valid_ratios: Tensor | None = None
    # Deformable DETR: the decoder's first reference points [B, Q, 2 or 4] (points, or boxes for
    # two-stage) and those after every layer [L, B, Q, 2 or 4]; with box refinement these are the
    # boxes each layer predicts.
    initial_reference: Tensor | None = None
    layer_references: Tensor | None = None

    @property
    def deformable(self) -> bool:
        """Whether the model sampled (Deformable DETR) rather than attended densely (DETR)."""
        return bool(self.encoder_sampling)


def bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by parameter name, however they were passed."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments


def request_attention_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook (with_kwargs) making nn.MultiheadAttention return its weights."""
    # Per-head weights, not the head average that need_weights=True alone returns.
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _attention_hook(records: list[AttentionRecord], name: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> None:
        records.append(AttentionRecord(name, output[1].detach()))

    return hook


def _sampling_hook(records: list[SamplingRecord], name: str) -> Callable:
    def hook(module: MSDeformAttn, args: tuple, kwargs: dict, output: Tensor) -> None:
        bound = bind_arguments(module, args, kwargs)
        locations, weights = module.sampling(
            bound["query"], bound["reference_points"], bound["spatial_shapes"]
        )
        records.append(
            SamplingRecord(
                name,
                query=bound["query"].detach(),
                reference_points=bound["reference_points"].detach(),
                sampling_locations=locations.detach(),
                attention_weights=weights.detach(),
                spatial_shapes=bound["spatial_shapes"],
                level_start_index=bound["level_start_index"],
            )
        )

    return hook


def _watch_attention(
    model: nn.Module, name: str, records: list[AttentionRecord]
) -> list[nn.modules.module.RemovableHandle]:
    module = model.get_submodule(name)
    return [
        module.register_forward_pre_hook(request_attention_weights, with_kwargs=True),
        module.register_forward_hook(_attention_hook(records, name)),
    ]


def _detr_hooks(model: nn.Module, internals: Internals) -> list:
    transformer = model.transformer
    handles = []
    for i in range(len(transformer.encoder.layers)):
        name = f"transformer.encoder.layers.{i}.self_attn"
        handles += _watch_attention(model, name, internals.encoder_attention)
    for i in range(len(transformer.decoder.layers)):
        prefix = f"transformer.decoder.layers.{i}"
        handles += _watch_attention(model, f"{prefix}.self_attn", internals.decoder_self_attention)
        handles += _watch_attention(
            model, f"{prefix}.multihead_attn", internals.decoder_cross_attention
        )

    def features(module: nn.Module, args: tuple, output: Tensor) -> None:
        internals.feature_shape = tuple(output.shape[-2:])  # [B, C, H, W] -> (H, W)

    def encoder_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = bind_arguments(module, args, kwargs)["key_padding_mask"]
        internals.padding_mask = None if mask is None else mask.detach()

    handles.append(model.input_proj.register_forward_hook(features))
    handles.append(transformer.encoder.register_forward_pre_hook(encoder_inputs, with_kwargs=True))
    return handles


def _deformable_hooks(model: nn.Module, internals: Internals) -> list:
    transformer = model.transformer
    handles = []
    for i, layer in enumerate(transformer.encoder.layers):
        name = f"transformer.encoder.layers.{i}.self_attn"
        hook = _sampling_hook(internals.encoder_sampling, name)
        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    for i, layer in enumerate(transformer.decoder.layers):
        name = f"transformer.decoder.layers.{i}.cross_attn"
        hook = _sampling_hook(internals.decoder_sampling, name)
        handles.append(layer.cross_attn.register_forward_hook(hook, with_kwargs=True))
        handles += _watch_attention(
            model, f"transformer.decoder.layers.{i}.self_attn", internals.decoder_self_attention
        )

    def encoder_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        internals.valid_ratios = bind_arguments(module, args, kwargs)["valid_ratios"].detach()

    def decoder_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        reference = bind_arguments(module, args, kwargs)["reference_points"]
        internals.initial_reference = reference.detach()

    def decoder_outputs(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> None:
        internals.layer_references = output[1].detach()  # [L, B, Q, 2 or 4]

    handles.append(transformer.encoder.register_forward_pre_hook(encoder_inputs, with_kwargs=True))
    handles.append(transformer.decoder.register_forward_pre_hook(decoder_inputs, with_kwargs=True))
    handles.append(transformer.decoder.register_forward_hook(decoder_outputs))
    return handles


# The hooks that record each model kind's internals, by kind name.
HOOKS: dict[str, Callable[[nn.Module, Internals], list]] = {
    "detr": _detr_hooks,
    "deformable_detr": _deformable_hooks,
    # The panoptic model's detector, under "detr."
    "detr_segmentation": lambda model, internals: _detr_hooks(model.detr, internals),
}


@contextmanager
def capture_internals(model: nn.Module) -> Iterator[Internals]:
    """Records the internals of the forward passes run inside the block.

    >>> with capture_internals(model) as internals:
    ...     outputs = model(images, mask)
    >>> internals.decoder_sampling[-1].sampling_locations.shape  # [B, Q, M, L, P, 2]

    Run one forward pass per block: a second one appends its records after the first's.
    """
    kind = kind_of(model.config)
    internals = Internals(model_type=kind.name)
    handles = HOOKS[kind.name](model, internals)
    try:
        yield internals
    finally:
        for handle in handles:
            handle.remove()

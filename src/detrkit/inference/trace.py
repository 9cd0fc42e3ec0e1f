"""The data flow of one forward pass, as a table of stages and tensor shapes.

Forward hooks on the model's modules write a row whenever a stage runs, with the shapes of the
tensors that actually flow through it, in the order they run; the notes say what each tensor is
(for attention inputs, what is added to Q, K and V). Nothing in the model is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.inference.capture import bind_arguments, request_attention_weights
from detrkit.models import kind_of


@dataclass
class TraceRow:
    stage: str  # e.g. "encoder layer 1"
    tensor: str  # e.g. "Q (query)"
    shape: str  # e.g. "[1, 850, 256]"
    note: str = ""


def shape_of(value) -> str:
    if isinstance(value, Tensor):
        return "[" + ", ".join(str(d) for d in value.shape) + "]"
    return "-"


class _Tracer:
    """Collects rows from hooks; :meth:`hook` and :meth:`pre_hook` register them."""

    def __init__(self) -> None:
        self.rows: list[TraceRow] = []
        self.handles: list = []

    def add(self, stage: str, tensor: str, value, note: str = "") -> None:
        self.rows.append(TraceRow(stage, tensor, shape_of(value), note))

    def pre_hook(self, module: nn.Module, write: Callable[[dict], None]) -> None:
        """``write(arguments by name)`` before ``module`` runs."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            write(bind_arguments(mod, args, kwargs))

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def hook(self, module: nn.Module, write: Callable[..., None], inputs: bool = False) -> None:
        """``write(output)`` (or ``write(arguments, output)``) after ``module`` runs."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if inputs:
                write(bind_arguments(mod, args, kwargs), output)
            else:
                write(output)

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _trace_attention(
    tracer: _Tracer, module: nn.MultiheadAttention, stage: str, qkv_notes: Sequence[str]
) -> None:
    """Q, K, V of an nn.MultiheadAttention call with what they are made of, and its weights."""
    tracer.handles.append(
        module.register_forward_pre_hook(request_attention_weights, with_kwargs=True)
    )

    def inputs(arguments: dict) -> None:
        for name, key, note in zip(("Q", "K", "V"), ("query", "key", "value"), qkv_notes):
            tracer.add(stage, name, arguments[key], note)

    def outputs(output: tuple[Tensor, Tensor]) -> None:
        heads = output[1].shape[1]
        tracer.add(stage, "attention weights", output[1], f"softmax over the keys, {heads} heads")
        tracer.add(stage, "attention output", output[0], "weighted sum of V, heads concatenated")

    tracer.pre_hook(module, inputs)
    tracer.hook(module, outputs)


def _trace_deformable_attention(
    tracer: _Tracer,
    module: nn.Module,
    stage: str,
    query_note: str,
    reference_note: str,
    value_note: str,
) -> None:
    """Query, reference points, values, sampling locations and weights of an MSDeformAttn call."""

    def write(arguments: dict, output: Tensor) -> None:
        tracer.add(stage, "Q (query)", arguments["query"], query_note)
        tracer.add(stage, "reference points", arguments["reference_points"], reference_note)
        tracer.add(stage, "V (input)", arguments["input_flatten"], value_note)
        locations, weights = module.sampling(
            arguments["query"], arguments["reference_points"], arguments["spatial_shapes"]
        )
        _, _, heads, levels, points, _ = locations.shape
        offsets_note = (
            "reference + Linear(Q) offsets / (W_l, H_l)"
            if arguments["reference_points"].shape[-1] == 2
            else "box centre + Linear(Q) offsets x box size / (2 P)"
        )
        tracer.add(stage, "sampling locations", locations, f"{offsets_note}; M={heads} heads")
        tracer.add(
            stage,
            "attention weights",
            weights,
            f"softmax of Linear(Q) over L x P = {levels} x {points}",
        )
        tracer.add(stage, "attention output", output, "bilinear samples of V, weighted, projected")

    tracer.hook(module, write, inputs=True)


def _trace_backbone(tracer: _Tracer, model: nn.Module) -> None:
    resnet, position = model.backbone[0], model.backbone[1]
    kind = "sine" if type(position).__name__ == "PositionEmbeddingSine" else "learned"

    def features(output: tuple[list[Tensor], list[Tensor]]) -> None:
        for layer, stride, feature in zip(resnet.return_layers, resnet.strides, output[0]):
            name = f"C{int(layer[-1]) + 1} ({layer})"
            tracer.add("backbone", name, feature, f"{model.config.backbone}, stride {stride}")

    calls = []

    def positions(output: Tensor) -> None:
        calls.append(output)
        tracer.add(
            "position encoding",
            f"level {len(calls) - 1}",
            output,
            f"{kind}, from the padding mask; added to Q and K, never to V",
        )

    tracer.hook(resnet, features)
    tracer.hook(position, positions)


def _trace_detr(tracer: _Tracer, model: nn.Module) -> None:
    transformer = model.transformer
    tracer.hook(
        model.input_proj,
        lambda out: tracer.add(
            "input projection", "src", out, f"1x1 conv, {model.input_proj.in_channels} -> C"
        ),
    )

    def encoder_inputs(arguments: dict) -> None:
        src = arguments["src"]
        tracer.add("encoder input", "src", src, f"feature map flattened: {src.shape[1]} positions")
        tracer.add("encoder input", "pos", arguments["pos"], "position encoding, flattened")
        tracer.add("encoder input", "key padding mask", arguments["key_padding_mask"])

    tracer.pre_hook(transformer.encoder, encoder_inputs)
    for i, layer in enumerate(transformer.encoder.layers):
        _trace_attention(
            tracer, layer.self_attn, f"encoder layer {i + 1}", ("src + pos", "src + pos", "src")
        )
    tracer.hook(transformer.encoder, lambda out: tracer.add("memory", "memory", out))

    def decoder_inputs(arguments: dict) -> None:
        tracer.add("decoder queries", "tgt", arguments["tgt"], "content: zeros at the start")
        tracer.add("decoder queries", "query_pos", arguments["query_pos"], "learned query_embed")

    tracer.pre_hook(transformer.decoder, decoder_inputs)
    for i, layer in enumerate(transformer.decoder.layers):
        stage = f"decoder layer {i + 1}"
        _trace_attention(
            tracer, layer.self_attn, stage + " self", ("tgt + query_pos", "tgt + query_pos", "tgt")
        )
        _trace_attention(
            tracer,
            layer.multihead_attn,
            stage + " cross",
            ("tgt + query_pos", "memory + pos", "memory"),
        )
    tracer.hook(
        transformer.decoder,
        lambda out: tracer.add("decoder output", "hs", out, "every layer, after the shared norm"),
    )
    tracer.hook(
        model.class_embed,
        lambda out: tracer.add("heads", "class logits", out, "Linear; last class is 'no object'"),
    )
    tracer.hook(
        model.bbox_embed,
        lambda out: tracer.add("heads", "box (before sigmoid)", out, "3-layer MLP -> cx, cy, w, h"),
    )


def _trace_deformable(tracer: _Tracer, model: nn.Module) -> None:
    transformer = model.transformer
    num_backbone = len(model.backbone[0].return_layers)
    for level, proj in enumerate(model.input_proj):
        conv = proj[0]
        note = (
            f"1x1 conv {conv.in_channels} -> C + GroupNorm"
            if level < num_backbone
            else f"3x3 stride-2 conv {conv.in_channels} -> C + GroupNorm (extra level)"
        )
        tracer.hook(
            proj,
            lambda out, level=level, note=note: tracer.add(
                "input projection", f"level {level}", out, note
            ),
        )

    def encoder_inputs(arguments: dict) -> None:
        shapes = arguments["spatial_shapes"].tolist()
        sizes = " + ".join(f"{h}x{w}" for h, w in shapes)
        stage = "encoder input"
        tracer.add(
            "level embedding", "level_embed", transformer.level_embed, "learned, one per level"
        )
        tracer.add(stage, "src", arguments["src"], f"levels flattened and concatenated: {sizes}")
        tracer.add(stage, "pos", arguments["pos"], "position encoding + its level's embedding")
        tracer.add(stage, "spatial_shapes", arguments["spatial_shapes"], f"(H, W): {shapes}")
        tracer.add(
            stage,
            "level_start_index",
            arguments["level_start_index"],
            f"{arguments['level_start_index'].tolist()}",
        )
        tracer.add(stage, "valid_ratios", arguments["valid_ratios"], "unpadded (w, h) per level")
        tracer.add(stage, "padding mask", arguments["padding_mask"])

    tracer.pre_hook(transformer.encoder, encoder_inputs)
    for i, layer in enumerate(transformer.encoder.layers):
        _trace_deformable_attention(
            tracer,
            layer.self_attn,
            f"encoder layer {i + 1}",
            "src + pos",
            "every pixel's centre, on every level",
            "src (no position); value_proj inside",
        )
    tracer.hook(transformer.encoder, lambda out: tracer.add("memory", "memory", out))

    if model.config.two_stage:
        last = transformer.decoder.num_layers
        proposal_rows = (
            (transformer.enc_output_norm, "proposal features", "Linear + LayerNorm of memory"),
            (transformer.decoder.class_embed[last], "proposal logits", "top-K by the first class"),
            (transformer.decoder.bbox_embed[last], "proposal deltas", "added to each pixel's box"),
            (transformer.pos_trans, "query_pos | tgt", "sine code of the top-K boxes, split"),
        )
        for module, name, note in proposal_rows:
            tracer.hook(
                module,
                lambda out, name=name, note=note: tracer.add(
                    "two-stage proposals", name, out, note
                ),
            )

    def decoder_inputs(arguments: dict) -> None:
        two_stage = model.config.two_stage
        tracer.add(
            "decoder queries",
            "tgt",
            arguments["tgt"],
            "from the proposals" if two_stage else "content half of query_embed",
        )
        tracer.add(
            "decoder queries",
            "query_pos",
            arguments["query_pos"],
            "from the proposals" if two_stage else "position half of query_embed",
        )
        tracer.add(
            "decoder queries",
            "reference points",
            arguments["reference_points"],
            "top-K proposal boxes" if two_stage else "sigmoid(Linear(query_pos)): (x, y)",
        )

    tracer.pre_hook(transformer.decoder, decoder_inputs)
    for i, layer in enumerate(transformer.decoder.layers):
        stage = f"decoder layer {i + 1}"
        _trace_attention(
            tracer, layer.self_attn, stage + " self", ("tgt + query_pos", "tgt + query_pos", "tgt")
        )
        _trace_deformable_attention(
            tracer,
            layer.cross_attn,
            stage + " cross",
            "tgt + query_pos",
            "this layer's references x valid ratios, per level",
            "memory (no position); value_proj inside",
        )

    def decoder_outputs(output: tuple[Tensor, Tensor]) -> None:
        hs, references = output
        tracer.add("decoder output", "hs", hs, "every layer's output")
        note = (
            "box after each layer (refinement)"
            if model.config.with_box_refine
            else "unchanged: no refinement"
        )
        tracer.add("decoder output", "references", references, note)

    tracer.hook(transformer.decoder, decoder_outputs)


# What each model kind's transformer is traced with, by kind name.
TRANSFORMER_TRACES: dict[str, Callable[[_Tracer, nn.Module], None]] = {
    "detr": _trace_detr,
    "deformable_detr": _trace_deformable,
}
# How pred_logits become class scores, by a kind's classification.
CLASS_SCORES = {"softmax": "softmax over classes + 'no object'", "sigmoid": "sigmoid per class"}


def trace_model(model: nn.Module, size: Sequence[int] = (800, 1066)) -> list[TraceRow]:
    """Runs ``model`` on one random image of ``size`` (H, W) and returns the trace rows."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"--size must be two positive numbers (H W), got {height} {width}")
    tracer = _Tracer()
    images = torch.randn(1, 3, height, width, device=next(model.parameters()).device)
    mask = torch.zeros(1, height, width, dtype=torch.bool, device=images.device)
    tracer.add("input", "images", images, "normalised RGB, padded to the batch's largest")
    tracer.add("input", "mask", mask, "True on padding")
    _trace_backbone(tracer, model)
    kind = kind_of(model.config)
    TRANSFORMER_TRACES[kind.name](tracer, model)
    try:
        with torch.no_grad():
            outputs = model.eval()(images, mask)
    finally:
        tracer.remove()
    tracer.add("output", "pred_logits", outputs["pred_logits"], CLASS_SCORES[kind.classification])
    tracer.add("output", "pred_boxes", outputs["pred_boxes"], "normalised cx, cy, w, h")
    if "aux_outputs" in outputs:
        tracer.add(
            "output",
            "aux_outputs",
            None,
            f"the same for the {len(outputs['aux_outputs'])} earlier decoder layer(s)",
        )
    return tracer.rows


def format_trace(rows: Sequence[TraceRow], title: str = "") -> str:
    """The rows as an aligned text table."""
    header = TraceRow("stage", "tensor", "shape", "what it is")
    widths = [
        max(len(getattr(row, name)) for row in [header, *rows])
        for name in ("stage", "tensor", "shape")
    ]
    lines = [title] if title else []
    previous = None
    for index, row in enumerate([header, *rows]):
        stage = row.stage if row.stage != previous else ""
        previous = row.stage
        cells = (stage, row.tensor, row.shape)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + row.note)
        if index == 0:
            lines.append("-" * (sum(widths) + 6 + len(header.note)))
    return "\n".join(line.rstrip() for line in lines)

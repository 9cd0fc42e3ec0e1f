"""The data flow of one forward pass: which tensors a model computes, from what, and where.

A model kind's flow is a list of :class:`FlowNode` declarations: a stage of the network ("encoder
layer", "decoder layer"...), the line of detrkit's code that computes the tensor, the nodes it is
computed from, and where a forward hook reads it. :func:`record_flow` runs hooks on a real
forward pass and fills every node with what flowed through it: its shape, summary statistics and,
for small integer tensors such as ``spatial_shapes``, the values themselves. Repeated layers share
one node with one call per layer. ``detrkit trace`` prints it as a table; ``detrkit explore`` draws
it as a graph. Nothing in the model is changed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrkit.inference.capture import bind_arguments, request_attention_weights
from detrkit.models import kind_of
from detrkit.models.backbone import Joiner, ResNetBackbone
from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.models.deformable_detr import DeformableDETR
from detrkit.models.deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
)
from detrkit.models.detr import DETR
from detrkit.models.position_encoding import PositionEmbeddingSine
from detrkit.models.segmentation import DETRSegmentation
from detrkit.models.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

# The folder holding the detrkit package: code paths are shown from there (detrkit/models/...).
SOURCE_ROOT = Path(__file__).resolve().parents[2]
SMALL_TENSOR = 16  # integer tensors up to this many elements are shown by value


@dataclass(frozen=True)
class CodeLine:
    """A line of detrkit's source: ``path`` relative to the package's parent, e.g.
    ``detrkit/models/transformer.py``; ``number`` 1-based."""

    path: str
    number: int
    text: str


def code_line(function: Callable, snippet: str) -> CodeLine:
    """The first line of ``function``'s source that contains ``snippet``; LookupError if none."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if snippet in line:
            path = Path(inspect.getsourcefile(function)).resolve()
            relative = path.relative_to(SOURCE_ROOT).as_posix()
            return CodeLine(relative, start + offset, line.strip())
    raise LookupError(f"{function.__qualname__} has no line containing {snippet!r}")


# How a hook reads a node's tensor: (module, its arguments by name, its output) -> a tensor, or a
# list of tensors when one call gives several (the heads of every decoder layer at once).
Reader = Callable[[nn.Module, dict, Any], Tensor | Sequence[Tensor] | None]


def argument(name: str) -> Reader:
    """Reads the argument ``name`` of the call."""
    return lambda module, arguments, output: arguments[name]


def output(index: int | str | None = None) -> Reader:
    """Reads the output of the call, or its item ``index``."""
    return lambda module, arguments, out: out if index is None else out[index]


@dataclass(frozen=True)
class Watch:
    """Where a node's tensor is read: ``read`` in a forward hook of the modules at ``path`` (a name
    in the model; ``*`` stands for every layer index, ``""`` for the model itself)."""

    path: str
    read: Reader
    needs_attention_weights: bool = False  # an nn.MultiheadAttention must return its weights


@dataclass
class FlowCall:
    """What one call of a node (one layer of a repeated node) computed."""

    shape: tuple[int, ...]
    dtype: str
    stats: dict[str, float] | None = None  # min, max, mean, std of floating-point tensors
    values: list | None = None  # small integer tensors, as nested lists


@dataclass
class FlowNode:
    """One tensor of the forward pass and where it comes from."""

    key: str  # unique in the flow, e.g. "encoder.qk"
    stage: str  # e.g. "encoder layer"; nodes of a repeated stage have one call per layer
    label: str  # e.g. "Q = K = src + pos"
    note: str  # what the tensor is
    code: CodeLine
    inputs: tuple[str, ...]  # keys of the nodes it is computed from
    watch: Watch
    calls: list[FlowCall] = field(default_factory=list)


# The stages whose nodes run once per layer.
REPEATED_STAGES = ("encoder layer", "decoder layer", "heads")


def describe(tensor: Tensor) -> FlowCall:
    """Shape, dtype and statistics (or values, for small integer tensors) of ``tensor``."""
    tensor = tensor.detach()
    call = FlowCall(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    if tensor.is_floating_point() and tensor.numel():
        values = tensor.float()
        call.stats = {
            "min": values.min().item(),
            "max": values.max().item(),
            "mean": values.mean().item(),
            "std": values.std().item() if values.numel() > 1 else 0.0,
        }
    elif tensor.numel() <= SMALL_TENSOR:
        call.values = tensor.tolist()
    return call


def _modules_at(model: nn.Module, path: str) -> list[nn.Module]:
    """The distinct modules at ``path``, ``*`` expanded over every index, in index order."""
    if not path:
        return [model]
    if "*" not in path:
        return [model.get_submodule(path)]
    prefix, _, suffix = path.partition(".*")
    modules, seen = [], set()
    for child in model.get_submodule(prefix):
        module = child.get_submodule(suffix.lstrip(".")) if suffix else child
        if id(module) not in seen:  # heads shared by every layer are hooked once
            seen.add(id(module))
            modules.append(module)
    return modules


@contextmanager
def record_flow(model: nn.Module) -> Iterator[list[FlowNode]]:
    """Fills the model kind's flow nodes with the forward pass run inside the block.

    >>> with record_flow(model) as nodes:
    ...     model(images, mask)
    >>> [(node.label, node.calls[0].shape) for node in nodes]
    """
    nodes = FLOWS[kind_of(model.config).name](model)
    handles = []
    for node in nodes:
        for module in _modules_at(model, node.watch.path):
            if node.watch.needs_attention_weights:
                handles.append(
                    module.register_forward_pre_hook(request_attention_weights, with_kwargs=True)
                )
            handles.append(module.register_forward_hook(_recorder(node), with_kwargs=True))
    try:
        yield nodes
    finally:
        for handle in handles:
            handle.remove()


def _recorder(node: FlowNode) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        read = node.watch.read(module, bind_arguments(module, args, kwargs), out)
        if read is None:
            return
        for tensor in [read] if isinstance(read, Tensor) else read:
            node.calls.append(describe(tensor))

    return hook


# ---------------------------------------------------------------------------------------------
# The flows


def _node(
    key: str,
    stage: str,
    label: str,
    note: str,
    code: tuple[Callable, str],
    inputs: Sequence[str],
    watch: Watch,
) -> FlowNode:
    return FlowNode(key, stage, label, note, code_line(*code), tuple(inputs), watch)


def _backbone_nodes(model: nn.Module, feature_inputs: Sequence[str]) -> list[FlowNode]:
    resnet = model.backbone[0]
    position_kind = "sine" if isinstance(model.backbone[1], PositionEmbeddingSine) else "learned"
    nodes = [
        _node(
            "images",
            "input",
            "images",
            "normalised RGB, padded to the batch's largest; mask: True on padding",
            (type(model).forward, "self.backbone(images, mask)"),
            (),
            Watch("", argument("images")),
        )
    ]
    for index, (layer, stride) in enumerate(zip(resnet.return_layers, resnet.strides)):
        nodes.append(
            _node(
                f"backbone.{layer}",
                "backbone",
                f"C{int(layer[-1]) + 1} ({layer})",
                f"{model.config.backbone} features, stride {stride}",
                (ResNetBackbone.forward, "features.append(x)"),
                feature_inputs if index == 0 else (f"backbone.{resnet.return_layers[index - 1]}",),
                Watch("backbone.0", lambda m, a, out, i=index: out[0][i]),
            )
        )
    nodes.append(
        _node(
            "position",
            "position",
            f"{position_kind} position encoding",
            "from the padding mask, one per level; added to Q and K, never to V",
            (
                (PositionEmbeddingSine.forward, "torch.cat((pos_y, pos_x)")
                if position_kind == "sine"
                else (Joiner.forward, "positions = ")
            ),
            ("images",),
            Watch("backbone.1", output()),
        )
    )
    return nodes


def _attention_nodes(
    prefix: str, stage: str, module_path: str, layer_class: type, qkv: Sequence[tuple]
) -> list[FlowNode]:
    """Q, K, V of an nn.MultiheadAttention at ``module_path`` (``*`` every layer) and its weights
    and output. ``qkv``: (label, note, code snippet in ``layer_class``, inputs) for q, k, v."""
    nodes = []
    for (label, note, method, snippet, inputs), name in zip(qkv, ("query", "key", "value")):
        nodes.append(
            _node(
                f"{prefix}.{name}",
                stage,
                label,
                note,
                (getattr(layer_class, method), snippet),
                inputs,
                Watch(module_path, argument(name)),
            )
        )
    method = qkv[0][2]
    nodes += [
        _node(
            f"{prefix}.weights",
            stage,
            "attention weights",
            "softmax(Q K^T / sqrt(C / M)) per head, over the keys; the forward does not keep "
            "them (need_weights=False): a hook asks nn.MultiheadAttention for them per head",
            (getattr(layer_class, method), "_attn("),
            (f"{prefix}.query", f"{prefix}.key"),
            Watch(module_path, output(1), needs_attention_weights=True),
        ),
        _node(
            f"{prefix}.out",
            stage,
            "attention output",
            "weights x V per head, heads concatenated and projected",
            (getattr(layer_class, method), "_attn("),
            (f"{prefix}.weights", f"{prefix}.value"),
            Watch(module_path, output(0)),
        ),
    ]
    return nodes


def _feed_forward_nodes(
    prefix: str, path: str, layer_class: type, norm: str, name: str
) -> list[FlowNode]:
    """DETR's position-wise MLP of a layer at ``path`` and the layer's output ``norm(x + MLP(x))``,
    the next layer's ``name``."""
    stage = f"{prefix} layer"
    return [
        _node(
            f"{prefix}.ffn",
            stage,
            "feed-forward",
            "Linear-ReLU-Linear of the attention's normalised sum",
            (layer_class.feed_forward, "self.linear2("),
            (f"{prefix}.{'self' if prefix == 'encoder' else 'cross'}.out",),
            Watch(f"{path}.linear2", output()),
        ),
        _node(
            f"{prefix}.out",
            stage,
            "layer output",
            f"{norm}(x + feed-forward): the next layer's {name}",
            (layer_class.forward, f"return self.add_norm(self.{norm},"),
            (f"{prefix}.ffn",),
            Watch(path, output()),
        ),
    ]


# Q, K and V of the decoder's self-attention among the object queries (both kinds).
DECODER_SELF_ATTENTION = (
    (
        "Q = tgt + query_pos",
        "self-attention among the queries",
        "self_attention",
        "q = k =",
        ("tgt", "query_pos"),
    ),
    ("K = tgt + query_pos", "the same as Q", "self_attention", "q = k =", ("tgt", "query_pos")),
    ("V = tgt", "content only", "self_attention", "return self.self_attn(", ("tgt",)),
)


def _detr_flow(model: DETR) -> list[FlowNode]:
    enc = "transformer.encoder.layers.*"
    dec = "transformer.decoder.layers.*"
    nodes = _backbone_nodes(model, ("images",))
    nodes += [
        _node(
            "input_proj",
            "input projection",
            "input projection",
            f"1x1 conv, {model.input_proj.in_channels} -> C channels",
            (DETR.forward, "src = self.input_proj("),
            (nodes[-2].key,),
            Watch("input_proj", output()),
        ),
        _node(
            "src",
            "input projection",
            "src (flattened)",
            "the feature map as a sequence of H*W positions",
            (Transformer.forward, "src = src.flatten(2)"),
            ("input_proj",),
            Watch("transformer.encoder", argument("src")),
        ),
        _node(
            "pos",
            "position",
            "pos (flattened)",
            "the same position encoding at every encoder and decoder layer",
            (Transformer.forward, "pos_embed = pos_embed.flatten(2)"),
            ("position",),
            Watch("transformer.encoder", argument("pos")),
        ),
    ]
    layer = TransformerEncoderLayer
    nodes += _attention_nodes(
        "encoder.self",
        "encoder layer",
        f"{enc}.self_attn",
        layer,
        (
            ("Q = src + pos", "content + position", "self_attention", "q = k =", ("src", "pos")),
            ("K = src + pos", "the same as Q", "self_attention", "q = k =", ("src", "pos")),
            ("V = src", "content only", "self_attention", "v = src", ("src",)),
        ),
    )
    nodes += _feed_forward_nodes("encoder", f"{enc}", layer, "norm2", "src")
    nodes += [
        _node(
            "memory",
            "memory",
            "memory",
            "the encoder's output: keys and values of every cross-attention",
            (TransformerEncoder.forward, "return src"),
            ("encoder.out",),
            Watch("transformer.encoder", output()),
        ),
        _node(
            "query_pos",
            "decoder queries",
            "query_pos",
            f"query_embed: {model.config.num_queries} learned positions, one per object query",
            (Transformer.forward, "query_pos = query_embed"),
            (),
            Watch("transformer.decoder", argument("query_pos")),
        ),
        _node(
            "tgt",
            "decoder queries",
            "tgt",
            "the queries' content: zeros before the first layer",
            (Transformer.forward, "tgt = torch.zeros_like"),
            (),
            Watch("transformer.decoder", argument("tgt")),
        ),
    ]
    layer = TransformerDecoderLayer
    nodes += _attention_nodes(
        "decoder.self",
        "decoder layer",
        f"{dec}.self_attn",
        layer,
        DECODER_SELF_ATTENTION,
    )
    nodes += _attention_nodes(
        "decoder.cross",
        "decoder layer",
        f"{dec}.multihead_attn",
        layer,
        (
            (
                "Q = tgt + query_pos",
                "",
                "cross_attention",
                "q = with_pos",
                ("decoder.self.out", "query_pos"),
            ),
            ("K = memory + pos", "", "cross_attention", "k = with_pos", ("memory", "pos")),
            ("V = memory", "no position", "cross_attention", "v = memory", ("memory",)),
        ),
    )
    nodes += _feed_forward_nodes("decoder", f"{dec}", layer, "norm3", "tgt")
    nodes += [
        _node(
            "hs",
            "decoder output",
            "hs",
            "every layer's output through the shared final norm",
            (TransformerDecoder.forward, "intermediate.append(self.norm(tgt))"),
            ("decoder.out",),
            Watch("transformer.decoder", output()),
        ),
    ]
    return nodes + _head_nodes(model, "hs")


def _layer_outputs(name: str) -> Reader:
    """Reads ``name`` of every decoder layer from a detector's outputs, first layer first."""

    def read(module: nn.Module, arguments: dict, out: dict) -> list[Tensor]:
        return [aux[name] for aux in out.get("aux_outputs", [])] + [out[name]]

    return read


# What the heads compute, and the lines that compute them, by a kind's classification.
HEAD_LINES = {
    "softmax": ("{classes} classes + 'no object'; softmax", "outputs_class = self.class_embed("),
    "sigmoid": ("{classes} classes; sigmoid per class", "outputs_classes.append("),
}
BOX_LINES = {"softmax": "outputs_coord = self.bbox_embed(", "sigmoid": "outputs_coords.append("}
# The detector's method that holds those lines.
HEAD_METHODS = {"softmax": "heads", "sigmoid": "forward"}


def _head_nodes(model: nn.Module, source: str) -> list[FlowNode]:
    classification = kind_of(model.config).classification
    class_note, class_code = HEAD_LINES[classification]
    forward = getattr(type(model), HEAD_METHODS[classification])
    return [
        _node(
            "pred_logits",
            "heads",
            "class logits",
            "Linear: " + class_note.format(classes=model.config.num_classes),
            (forward, class_code),
            (source,),
            Watch("", _layer_outputs("pred_logits")),
        ),
        _node(
            "pred_boxes",
            "heads",
            "boxes",
            "3-layer MLP, sigmoid: normalised cx, cy, w, h",
            (forward, BOX_LINES[classification]),
            (source,),
            Watch("", _layer_outputs("pred_boxes")),
        ),
    ]


def _sampling(index: int) -> Reader:
    """Reads the sampling locations (0) or attention weights (1) an MSDeformAttn call used."""

    def read(module: MSDeformAttn, arguments: dict, out: Tensor) -> Tensor:
        return module.sampling(
            arguments["query"], arguments["reference_points"], arguments["spatial_shapes"]
        )[index]

    return read


def _deformable_attention_nodes(
    prefix: str,
    stage: str,
    path: str,
    query_inputs: Sequence[str],
    query_labels: Sequence[str],
    value_input: str,
    references: str,
) -> list[FlowNode]:
    layer_class = (
        DeformableTransformerEncoderLayer
        if stage == "encoder layer"
        else DeformableTransformerDecoderLayer
    )
    point_formula = "reference + offsets / (W_l, H_l) (point references)"
    box_formula = "centre + offsets / P x box size / 2 (box references)"
    formula = {
        "points": point_formula,
        "boxes": box_formula,
        "point then boxes": f"layer 1: {point_formula}; later layers: {box_formula}",
    }[references]
    return [
        _node(
            f"{prefix}.query",
            stage,
            "query = " + " + ".join(query_labels),
            "offsets and weights are Linear maps of it",
            (layer_class.forward, "with_pos("),
            query_inputs,
            Watch(path, argument("query")),
        ),
        _node(
            f"{prefix}.reference_points",
            stage,
            "reference points",
            "per level, in each level's valid area: "
            + ("points (x, y)" if references == "points" else "boxes (cx, cy, w, h) or points"),
            (
                (DeformableTransformerEncoder.get_reference_points, "return reference_points")
                if stage == "encoder layer"
                else (DeformableTransformerDecoder.forward, "reference_points_input = ")
            ),
            ("spatial_shapes",) if stage == "encoder layer" else ("reference_points",),
            Watch(path, argument("reference_points")),
        ),
        _node(
            f"{prefix}.value",
            stage,
            "value = value_proj(" + value_input + ")",
            "no position; split into M heads",
            (MSDeformAttn.forward, "value = self.value_proj("),
            (value_input,),
            Watch(f"{path}.value_proj", output()),
        ),
        _node(
            f"{prefix}.offsets",
            stage,
            "sampling offsets",
            "Linear(query): M heads x L levels x P points x (x, y)",
            (MSDeformAttn.sampling, "sampling_offsets = self.sampling_offsets("),
            (f"{prefix}.query",),
            # Read from the attention's own call: the offsets Linear also runs when the sampling
            # is re-run for the records below.
            Watch(path, lambda m, a, out: m.sampling_offsets(a["query"])),
        ),
        _node(
            f"{prefix}.weights",
            stage,
            "attention weights",
            "softmax of Linear(query) over L levels x P points, per head",
            (MSDeformAttn.sampling, "F.softmax("),
            (f"{prefix}.query",),
            Watch(path, _sampling(1)),
        ),
        _node(
            f"{prefix}.locations",
            stage,
            "sampling locations",
            formula,
            (
                (MSDeformAttn.locate, "centre + sampling_offsets")
                if references == "boxes"
                else (
                    MSDeformAttn.locate,
                    "reference_points + sampling_offsets / offset_normalizer",
                )
            ),
            (f"{prefix}.reference_points", f"{prefix}.offsets", "spatial_shapes"),
            Watch(path, _sampling(0)),
        ),
        _node(
            f"{prefix}.out",
            stage,
            "deformable attention output",
            "bilinear samples of value at the locations, weighted, summed, output_proj",
            (MSDeformAttn.forward, "return self.output_proj("),
            (f"{prefix}.value", f"{prefix}.locations", f"{prefix}.weights", "level_start_index"),
            Watch(path, output()),
        ),
    ]


def decoder_references(config) -> str:
    """What Deformable DETR's decoder layers sample around: "points", "boxes" (two-stage: the
    proposals are boxes), or "point then boxes" (box refinement turns the first layer's points
    into boxes)."""
    if config.two_stage:
        return "boxes"
    return "point then boxes" if config.with_box_refine else "points"


def _deformable_flow(model: DeformableDETR) -> list[FlowNode]:
    config = model.config
    nodes = _backbone_nodes(model, ("images",))
    backbone_keys = [n.key for n in nodes if n.stage == "backbone"]
    for level, proj in enumerate(model.input_proj):
        extra = level >= len(backbone_keys)
        conv = proj[0]
        nodes.append(
            _node(
                f"input_proj.{level}",
                "input projection",
                f"level {level}",
                (
                    f"3x3 stride-2 conv {conv.in_channels} -> C + GroupNorm (extra level)"
                    if extra
                    else f"1x1 conv {conv.in_channels} -> C + GroupNorm"
                ),
                (
                    (DeformableDETR.forward, "src = self.input_proj[level](")
                    if extra
                    else (DeformableDETR.forward, "srcs = [proj(feature)")
                ),
                (
                    (
                        backbone_keys[-1]
                        if level == len(backbone_keys)
                        else f"input_proj.{level - 1}",
                    )
                    if extra
                    else (backbone_keys[level],)
                ),
                Watch(f"input_proj.{level}", output()),
            )
        )
    levels = [f"input_proj.{level}" for level in range(len(model.input_proj))]
    transformer = DeformableTransformer.forward
    nodes += [
        _node(
            "spatial_shapes",
            "levels",
            "spatial_shapes",
            "(H, W) of every level",
            (transformer, "spatial_shapes = torch.stack("),
            levels,
            Watch("transformer.encoder", argument("spatial_shapes")),
        ),
        _node(
            "level_start_index",
            "levels",
            "level_start_index",
            "where each level starts in the flattened sequence",
            (transformer, "level_start_index = torch.cat("),
            ("spatial_shapes",),
            Watch("transformer.encoder", argument("level_start_index")),
        ),
        _node(
            "valid_ratios",
            "levels",
            "valid_ratios",
            "the unpadded fraction (w, h) of every level",
            (transformer, "valid_ratios = torch.stack("),
            ("images",),
            Watch("transformer.encoder", argument("valid_ratios")),
        ),
        _node(
            "src",
            "levels",
            "src (flattened)",
            "every level's pixels, flattened and concatenated",
            (transformer, "src_flatten = torch.cat("),
            levels,
            Watch("transformer.encoder", argument("src")),
        ),
        _node(
            "pos",
            "position",
            "pos = position + level_embed",
            "sine position of the pixel + the learned embedding of its level",
            (transformer, "lvl_pos_embed = pos_embed + self.level_embed[level]"),
            ("position",),
            Watch("transformer.encoder", argument("pos")),
        ),
    ]
    enc = "transformer.encoder.layers.*"
    nodes += _deformable_attention_nodes(
        "encoder.attn",
        "encoder layer",
        f"{enc}.self_attn",
        ("src", "pos"),
        ("src", "pos"),
        "src",
        references="points",
    )
    nodes += [
        _node(
            "encoder.ffn",
            "encoder layer",
            "feed-forward",
            "norm2(x + Linear-ReLU-Linear(x)), x = norm1(src + attention)",
            (DeformableTransformerEncoderLayer.feed_forward, "return self.add_norm(self.norm2,"),
            ("encoder.attn.out",),
            Watch(enc, output()),
        ),
        _node(
            "memory",
            "memory",
            "memory",
            "the encoder's output: the values every decoder layer samples",
            (DeformableTransformerEncoder.forward, "return src"),
            ("encoder.ffn",),
            Watch("transformer.encoder", output()),
        ),
    ]
    if config.two_stage:
        nodes += [
            _node(
                "proposals.memory",
                "two-stage proposals",
                "output memory",
                "LayerNorm(Linear(memory)): a proposal at every position",
                (
                    DeformableTransformer.gen_encoder_output_proposals,
                    "return self.enc_output_norm(",
                ),
                ("memory",),
                Watch("transformer.enc_output_norm", output()),
            ),
            _node(
                "proposals.logits",
                "two-stage proposals",
                "proposal logits",
                "the extra class head; the top K by the first class become the queries",
                (transformer, "enc_outputs_class = self.decoder.class_embed["),
                ("proposals.memory",),
                Watch("", lambda m, a, out: out["enc_outputs"]["pred_logits"]),
            ),
            _node(
                "proposals.boxes",
                "two-stage proposals",
                "proposal boxes",
                "the extra box head + each position's own box",
                (transformer, "enc_outputs_coord_unact = ("),
                ("proposals.memory",),
                Watch("", lambda m, a, out: out["enc_outputs"]["pred_boxes"]),
            ),
            _node(
                "query_pos",
                "decoder queries",
                "query_pos | tgt",
                "LayerNorm(Linear(sine code of the top-K boxes)), split in two",
                (transformer, "query_pos, tgt = torch.split(pos_trans_out"),
                ("proposals.boxes",),
                Watch("transformer.pos_trans_norm", output()),
            ),
            _node(
                "reference_points",
                "decoder queries",
                "reference boxes",
                "the top-K proposal boxes",
                (transformer, "reference_points = topk_coords_unact.sigmoid()"),
                ("proposals.logits", "proposals.boxes"),
                Watch("transformer.decoder", argument("reference_points")),
            ),
        ]
    else:
        nodes += [
            _node(
                "query_pos",
                "decoder queries",
                "query_pos",
                "position half of query_embed",
                (transformer, "query_pos, tgt = torch.split(query_embed"),
                (),
                Watch("transformer.decoder", argument("query_pos")),
            ),
            _node(
                "reference_points",
                "decoder queries",
                "reference points",
                "sigmoid(Linear(query_pos)): normalised (x, y)",
                (transformer, "reference_points = self.reference_points("),
                ("query_pos",),
                Watch("transformer.decoder", argument("reference_points")),
            ),
        ]
    nodes.append(
        _node(
            "tgt",
            "decoder queries",
            "tgt",
            "the queries' content" + (": from the proposals" if config.two_stage else ""),
            (
                (transformer, "query_pos, tgt = torch.split(pos_trans_out")
                if config.two_stage
                else (transformer, "tgt = tgt.unsqueeze(0)")
            ),
            ("query_pos",) if config.two_stage else (),
            Watch("transformer.decoder", argument("tgt")),
        )
    )
    dec = "transformer.decoder.layers.*"
    layer = DeformableTransformerDecoderLayer
    nodes += _attention_nodes(
        "decoder.self",
        "decoder layer",
        f"{dec}.self_attn",
        layer,
        DECODER_SELF_ATTENTION,
    )
    nodes += _deformable_attention_nodes(
        "decoder.cross",
        "decoder layer",
        f"{dec}.cross_attn",
        ("decoder.self.out", "query_pos"),
        ("tgt", "query_pos"),
        "memory",
        references=decoder_references(config),
    )
    nodes += [
        _node(
            "decoder.ffn",
            "decoder layer",
            "feed-forward",
            "norm3(x + Linear-ReLU-Linear(x)), x = norm1(tgt + attention)",
            (DeformableTransformerDecoderLayer.feed_forward, "return self.add_norm(self.norm3,"),
            ("decoder.cross.out",),
            Watch(dec, output()),
        ),
    ]
    if config.with_box_refine:
        nodes.append(
            _node(
                "decoder.refine",
                "decoder layer",
                "refined reference",
                "the layer's box head moves its reference box: the next layer's reference",
                (DeformableTransformerDecoder.forward, "reference_points = refine_boxes("),
                ("decoder.ffn",),
                Watch("transformer.decoder", lambda m, a, out: list(out[1])),
            )
        )
    nodes.append(
        _node(
            "hs",
            "decoder output",
            "hs",
            "every layer's output",
            (DeformableTransformerDecoder.forward, "return torch.stack(intermediate)"),
            ("decoder.ffn",),
            Watch("transformer.decoder", output(0)),
        )
    )
    return nodes + _head_nodes(model, "hs")


def _detr_segmentation_flow(model: DETRSegmentation) -> list[FlowNode]:
    """The detector's flow under ``detr.``, then the mask head."""
    nodes = _detr_flow(model.detr)
    for node in nodes:
        if node.watch.path:  # "" is the whole model: its images and outputs are the detector's
            node.watch = dataclasses.replace(node.watch, path="detr." + node.watch.path)
    forward = DETRSegmentation.forward
    # The lines of DETR.forward that this model's own forward runs in its place.
    own_lines = {"images": "detr.backbone(images, mask)", "input_proj": "src = detr.input_proj("}
    for node in nodes:
        if node.key in own_lines:
            node.code = code_line(forward, own_lines[node.key])
    backbone = [node.key for node in nodes if node.stage == "backbone"]
    return [
        *nodes,
        _node(
            "bbox_mask",
            "mask head",
            "attention maps",
            "the last decoder layer's outputs over the memory: softmax(q k^T) per head, "
            "normalised over heads and positions together",
            (forward, "bbox_mask = self.bbox_attention("),
            ("hs", "memory"),
            Watch("bbox_attention", output()),
        ),
        _node(
            "pred_masks",
            "mask head",
            "mask logits",
            "3x3 convs and group norm on [C5 projection | attention maps], upsampled with "
            "C4, C3, C2 added: one map per query at stride 4",
            (forward, 'out["pred_masks"] = '),
            ("bbox_mask", "input_proj", *backbone[:-1]),
            Watch("", output("pred_masks")),
        ),
    ]


# The flow of each model kind, by kind name.
FLOWS: dict[str, Callable[[nn.Module], list[FlowNode]]] = {
    "detr": _detr_flow,
    "deformable_detr": _deformable_flow,
    "detr_segmentation": _detr_segmentation_flow,
}


# ---------------------------------------------------------------------------------------------
# The table


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def flow_table(nodes: Sequence[FlowNode]) -> list[tuple[str, str, str, str]]:
    """(stage, tensor, shape, note) rows; a repeated stage's calls share one row, its stage
    naming the layer count, when every layer gave the same shape."""
    rows = []
    for node in nodes:
        if not node.calls:
            continue
        shapes = []
        for call in node.calls:
            if call.shape not in shapes:
                shapes.append(call.shape)
        stage = node.stage
        if stage in REPEATED_STAGES:
            stage = f"{stage} x{len(node.calls)}"
        shape = " | ".join(shape_text(s) for s in shapes)
        note = node.note
        if node.calls[0].values is not None:
            note = f"{note}: {node.calls[0].values}"
        rows.append((stage, node.label, shape, note))
    return rows


def format_trace(nodes: Sequence[FlowNode], title: str = "") -> str:
    """The flow as an aligned text table, repeated layers collapsed into one block."""
    header = ("stage", "tensor", "shape", "what it is")
    rows = flow_table(nodes)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [title] if title else []
    previous = None
    for index, row in enumerate([header, *rows]):
        stage = row[0] if row[0] != previous else ""
        previous = row[0]
        cells = (stage, row[1], row[2])
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + row[3])
        if index == 0:
            lines.append("-" * (sum(widths) + 6 + len(header[3])))
    return "\n".join(line.rstrip() for line in lines)


def trace_model(
    model: nn.Module, images: Tensor | None = None, size: Sequence[int] = (800, 1066)
) -> list[FlowNode]:
    """Runs ``model`` once (on ``images`` ``[B, 3, H, W]``, normalised, or on one random image of
    ``size`` (H, W)) and returns its flow nodes."""
    if images is None:
        height, width = size
        if height < 1 or width < 1:
            raise ValueError(f"--size must be two positive numbers (H W), got {height} {width}")
        images = torch.randn(1, 3, height, width, device=next(model.parameters()).device)
    with torch.no_grad(), record_flow(model) as nodes:
        model.eval()(images)
    return nodes

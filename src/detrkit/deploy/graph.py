"""The module an export traces: a detector reduced to plain tensors in and out.

Exported graphs take ``images`` ``[B, 3, H, W]`` (normalised as the models take them), optionally
``mask`` ``[B, H, W]`` (True on padding) and, with post-processing, ``orig_sizes`` ``[B, 2]`` (each
image's (height, width) in pixels). They return the final ``pred_logits`` and ``pred_boxes``
(no auxiliary outputs) or, post-processed, ``scores``, ``labels``, absolute xyxy ``boxes`` and
``queries`` (the object query of each detection).
Panoptic models (DETR's mask head) add ``pred_masks`` ``[B, K, ceil(H/4), ceil(W/4)]``: the mask
logits of each query, or of each detection when post-processed (K = Q for DETR, whose detections
are its queries in order), at stride 4 of the padded input. Upsampling them to the image and
thresholding stay in Python: at the input's size they would be K times the image. Batch, height
and width are dynamic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from detrkit.deploy.errors import ExportError
from detrkit.models import DETRSegmentationConfig, PostProcess

RAW_OUTPUTS = ("pred_logits", "pred_boxes")
DETECTION_OUTPUTS = ("scores", "labels", "boxes", "queries")
# The panoptic models' extra output, raw or post-processed.
MASK_OUTPUT = "pred_masks"
# Dynamic axes of each input; every other axis is fixed.
DYNAMIC_AXES = {"images": (0, 2, 3), "mask": (0, 1, 2), "orig_sizes": (0,)}
# Readable names for the dynamic axes of the exported graph's inputs and outputs.
AXIS_NAMES = {
    "images": ("batch", None, "height", "width"),
    "mask": ("batch", "height", "width"),
    "orig_sizes": ("batch", None),
}


class ExportedDetector(nn.Module):
    """Calls ``model`` with the inputs named in ``input_names`` (in that order) and returns the
    outputs named in ``output_names``, as a tuple."""

    def __init__(
        self,
        model: nn.Module,
        with_mask: bool = True,
        with_postprocess: bool = False,
        num_select: int = 100,
    ) -> None:
        super().__init__()
        self.model = model
        self.input_names = ["images", *(["mask"] if with_mask else [])]
        self.postprocess = None
        if with_postprocess:
            self.input_names.append("orig_sizes")
            self.postprocess = PostProcess.for_config(model.config)
            self.postprocess.num_select = num_select
        self.output_names = list(DETECTION_OUTPUTS if with_postprocess else RAW_OUTPUTS)
        self.with_masks = has_masks(model)
        if self.with_masks:
            self.output_names.append(MASK_OUTPUT)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.input_names, inputs))
        outputs = self.model(named["images"], named.get("mask"))
        if self.postprocess is None:
            found = outputs
        else:
            found = self.postprocess.batched(outputs, named["orig_sizes"])
            if self.with_masks:
                # Each detection's query's masks (the queries themselves, in order, for DETR).
                masks = outputs[MASK_OUTPUT]  # [B, Q, h, w]
                index = found["queries"][:, :, None, None].expand(-1, -1, *masks.shape[-2:])
                found[MASK_OUTPUT] = masks.gather(1, index)  # [B, K, h, w]
        return tuple(found[name] for name in self.output_names)

    def example_inputs(self, size: tuple[int, int], batch: int = 2) -> tuple[Tensor, ...]:
        """Inputs to trace with. The batch is 2, not 1: tracing treats a size of 1 as special and
        would fix it."""
        height, width = size
        generator = torch.Generator().manual_seed(0)
        values = {
            "images": torch.randn(batch, 3, height, width, generator=generator),
            "mask": torch.zeros(batch, height, width, dtype=torch.bool),
            "orig_sizes": torch.tensor([[height, width]] * batch),
        }
        return tuple(values[name] for name in self.input_names)

    def dynamic_shapes(self) -> tuple:
        """torch.export's ``dynamic_shapes`` for :meth:`forward`: batch, height and width of every
        input are dynamic, their ranges inferred from the model."""
        return (
            tuple({axis: Dim.AUTO for axis in DYNAMIC_AXES[name]} for name in self.input_names),
        )


def has_masks(model: nn.Module) -> bool:
    """Whether ``model`` is a panoptic model, whose outputs add ``pred_masks``."""
    return isinstance(model.config, DETRSegmentationConfig)


def check_dynamic(program: ExportedProgram, input_names: list[str], exporter: str) -> None:
    """Raises ExportError when tracing fixed a dynamic axis or bounded it above: Dim.AUTO lets
    export pin a dimension silently where the code needs one value (or, for a feature map of 1
    pixel, a range of values), and a graph that only runs at the export size is an error here,
    not a surprise at deployment."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, node_name in zip(input_names, program.graph_signature.user_inputs):
        shape = placeholders[node_name].meta["val"].shape
        for axis in DYNAMIC_AXES[name]:
            dim = shape[axis]
            if _is_fixed(dim):
                raise ExportError(
                    f"{exporter} fixed axis {axis} ({AXIS_NAMES[name][axis]}) of {name} to the "
                    f"export's {int(dim)}: the model's code specialises on it"
                )
            bounds = program.range_constraints.get(dim.node.expr)
            if bounds is not None and not math.isinf(float(bounds.upper)):
                raise ExportError(
                    f"{exporter} bounded axis {axis} ({AXIS_NAMES[name][axis]}) of {name} to at "
                    f"most {int(bounds.upper)}: the export would not run on larger inputs"
                )


def _is_fixed(dim: int | torch.SymInt) -> bool:
    """Whether a traced size is a constant, including a symbol that tracing later pinned."""
    if isinstance(dim, int):
        return True
    return dim.node.shape_env.replace(dim.node.expr).is_number

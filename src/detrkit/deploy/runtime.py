"""Running an exported file: ONNX Runtime for .onnx, ``torch.export.load`` for .pt2."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detrkit.deploy.errors import ExportError
from detrkit.deploy.to_onnx import require_onnx
from detrkit.deploy.to_program import load_program


def file_format(path: Path) -> str:
    """The format of an exported file: "torch" for a torch.export archive (a zip), else "onnx"."""
    return "torch" if zipfile.is_zipfile(path) else "onnx"


class ExportedModel:
    """An exported detector, callable with named tensors.

    >>> exported = ExportedModel("detr.onnx")
    >>> outputs = exported(images=images, mask=mask)  # {"pred_logits": ..., "pred_boxes": ...}
    >>> exported.output_names  # a panoptic model's add "pred_masks"
    >>> exported.metadata["class_names"]  # JSON text

    ONNX files run on ONNX Runtime's CPU provider, programs with ``torch.export.load``; a
    program's ``ExportedProgram`` is kept as ``program``, for looking at its graph.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.format = file_format(self.path)
        if self.format == "onnx":
            require_onnx()
        try:
            if self.format == "onnx":
                self._open_onnx(threads)
            else:
                self._open_program()
        except Exception as error:  # whatever the runtime raises for a file it cannot read
            raise ExportError(f"{self.path}: cannot open the exported model: {error}") from error
        self.input_names = json.loads(self.metadata.get("inputs", '["images", "mask"]'))
        self.output_names = json.loads(
            self.metadata.get("outputs", '["pred_logits", "pred_boxes"]')
        )

    def _open_onnx(self, threads: int | None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)

    def _open_program(self) -> None:
        self.program, self.metadata = load_program(self.path)
        self._module = self.program.module()

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        """Runs the model on CPU tensors named as its inputs; returns its outputs by name."""
        missing = [name for name in self.input_names if name not in inputs]
        unknown = [name for name in inputs if name not in self.input_names]
        if missing or unknown:
            raise ValueError(
                f"{self.path.name} takes {', '.join(self.input_names)}; "
                f"got {', '.join(inputs) or 'nothing'}"
            )
        ordered = [inputs[name].detach().cpu() for name in self.input_names]
        if self.format == "onnx":
            feeds = {
                name: np.ascontiguousarray(t.numpy()) for name, t in zip(self.input_names, ordered)
            }
            outputs = [torch.from_numpy(o) for o in self._session.run(self.output_names, feeds)]
        else:
            with torch.no_grad():
                outputs = list(self._module(*ordered))
        return dict(zip(self.output_names, outputs))

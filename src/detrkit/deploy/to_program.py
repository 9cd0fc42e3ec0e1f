"""``torch.export`` programs (.pt2) with dynamic batch, height and width.

Deformable DETR keeps the fused attention kernel: it is a ``torch.library`` custom op whose fake
implementation gives export its output shape. Loading such a program needs the op registered,
that is ``import detrkit`` before ``torch.export.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.export import ExportedProgram

from detrkit.deploy.errors import ExportError
from detrkit.deploy.graph import DYNAMIC_AXES, ExportedDetector

# The archive member that holds the export metadata.
METADATA_FILE = "detrkit.json"


def export_program(graph: ExportedDetector, size: tuple[int, int]) -> ExportedProgram:
    """Traces ``graph`` with torch.export; checks that batch, height and width stayed dynamic."""
    try:
        program = torch.export.export(
            graph, graph.example_inputs(size), dynamic_shapes=graph.dynamic_shapes()
        )
    except Exception as error:
        raise ExportError(f"torch.export could not export the model: {error}") from error
    _check_dynamic(program, graph.input_names)
    return program


def _check_dynamic(program: ExportedProgram, input_names: list[str]) -> None:
    """Dim.AUTO lets export fix a dimension silently where the code needs one value; a program
    that only runs at the export size is an error here, not a surprise at deployment."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, node_name in zip(input_names, program.graph_signature.user_inputs):
        shape = placeholders[node_name].meta["val"].shape
        fixed = [axis for axis in DYNAMIC_AXES[name] if _is_fixed(shape[axis])]
        if fixed:
            axes = " and ".join(str(axis) for axis in fixed)
            raise ExportError(
                f"torch.export fixed axis {axes} of {name} to the export's {tuple(shape)}: the "
                "model's code specialises on it"
            )


def _is_fixed(dim: int | torch.SymInt) -> bool:
    """Whether a traced size is a constant, including a symbol that tracing later pinned."""
    if isinstance(dim, int):
        return True
    return dim.node.shape_env.replace(dim.node.expr).is_number


def save_program(program: ExportedProgram, path: Path, metadata: dict) -> None:
    """Writes the program with ``metadata`` as a JSON member of the archive."""
    with open(path, "wb") as file:
        torch.export.save(program, file, extra_files={METADATA_FILE: json.dumps(metadata)})


def load_program(path: Path) -> tuple[ExportedProgram, dict]:
    """The program and its metadata."""
    import detrkit.ops  # noqa: F401  registers the fused attention op a program may call

    extra_files = {METADATA_FILE: ""}
    with open(path, "rb") as file:  # a file object: load wants a path to end in .pt2
        program = torch.export.load(file, extra_files=extra_files)
    metadata = json.loads(extra_files[METADATA_FILE]) if extra_files[METADATA_FILE] else {}
    return program, metadata

"""``torch.export`` programs (.pt2) with dynamic batch, height and width.

Deformable DETR keeps the fused attention kernel: it is a ``torch.library`` custom op whose fake
implementation gives export its output shape. Loading such a program needs the op registered,
that is ``import detrkit`` before ``torch.export.load``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch.export import ExportedProgram

from detrkit.deploy.errors import ExportError
from detrkit.deploy.graph import ExportedDetector, check_dynamic

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
    check_dynamic(program, graph.input_names, "torch.export")
    return program


def save_program(program: ExportedProgram, tmp: Path, metadata: dict) -> None:
    """Writes the program with ``metadata`` as a JSON member of the archive to ``tmp``, a
    temporary file of write_atomically."""
    # The archive is built in memory and written in one piece from Python: torch's zip writer,
    # writing to a file that fails (a full disk), raises an OSError and then aborts the process
    # when it is destroyed (it tries to finish the archive and throws from its destructor).
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    tmp.write_bytes(buffer.getbuffer())


def load_program(path: Path) -> tuple[ExportedProgram, dict]:
    """The program and its metadata."""
    import detrkit.ops  # noqa: F401  registers the fused attention op a program may call

    extra_files = {METADATA_FILE: ""}
    with open(path, "rb") as file:  # a file object: load wants a path to end in .pt2
        program = torch.export.load(file, extra_files=extra_files)
    metadata = json.loads(extra_files[METADATA_FILE]) if extra_files[METADATA_FILE] else {}
    return program, metadata

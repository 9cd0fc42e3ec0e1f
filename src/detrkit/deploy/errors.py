"""The exception for exports that cannot be made or do not compute what PyTorch computes."""

from __future__ import annotations


class ExportError(Exception):
    """An export failed, could not be written, or its output differs from PyTorch's.

    The message names the file or the output and, for a mismatch, by how much.
    """


def missing_onnx_packages(error: ImportError) -> ModuleNotFoundError:
    """The error for ONNX packages that are not installed, naming the extra that brings them."""
    return ModuleNotFoundError(
        f"ONNX export needs onnx, onnxruntime and onnxscript; {error.name or error} is not "
        "installed. Install them with: pip install 'detrkit[export]'"
    )

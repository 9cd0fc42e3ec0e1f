"""detrkit's operators for ONNX Runtime: a custom-op library built from ``csrc/onnxruntime_ops.cpp``
on first use, compiled once per machine and cached.

An export made with ``attention_op="detrkit"`` writes Deformable DETR's attention as one
``ai.detrkit::MultiScaleDeformableAttention`` node (see :mod:`detrkit.ops.ms_deform_attn_onnx`),
which ONNX Runtime runs with this library loaded::

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(str(detrkit.ops.onnxruntime_library()))

The library is compiled with the system's C++ compiler against ONNX Runtime's C API headers
(1.17 or later), found in ``ONNXRUNTIME_INCLUDE_DIR`` or the system's include directories
(Debian 13 and later: ``apt-get install libonnxruntime-dev``). It links against nothing of
ONNX Runtime's, so headers of one version serve every runtime at least as new.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

INCLUDE_VARIABLE = "ONNXRUNTIME_INCLUDE_DIR"

_CSRC = Path(__file__).parent / "csrc"
_SOURCE = _CSRC / "onnxruntime_ops.cpp"
_HEADERS = [_CSRC / "ms_deform_attn_sampling.h"]
_SYSTEM_INCLUDES = [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
_API_HEADER = "onnxruntime_c_api.h"
_LIBRARY = "libdetrkit_onnxruntime.so"


class OnnxRuntimeLibraryError(RuntimeError):
    """detrkit's ONNX Runtime operators cannot be built here; the message says why."""


def onnxruntime_include_dir() -> Path:
    """The directory of ONNX Runtime's C API headers: ``ONNXRUNTIME_INCLUDE_DIR`` when set, else
    the first system include directory that has them. Raises OnnxRuntimeLibraryError naming
    where it looked."""
    configured = os.environ.get(INCLUDE_VARIABLE)
    candidates = [Path(configured)] if configured else _SYSTEM_INCLUDES
    for directory in candidates:
        if (directory / _API_HEADER).is_file():
            return directory
    if configured:
        raise OnnxRuntimeLibraryError(
            f"{INCLUDE_VARIABLE}={configured} has no {_API_HEADER}: point it at the include "
            "directory of ONNX Runtime's C API headers"
        )
    looked = ", ".join(str(directory) for directory in candidates)
    raise OnnxRuntimeLibraryError(
        f"building detrkit's ONNX Runtime operators needs ONNX Runtime's C API headers, found in "
        f"none of {looked}: install them (Debian 13 or later: apt-get install libonnxruntime-dev) "
        f"or set {INCLUDE_VARIABLE} to their directory"
    )


def _compiler() -> str:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise OnnxRuntimeLibraryError(
            f"building detrkit's ONNX Runtime operators needs a C++ compiler; {compiler!r} is not "
            "on PATH (set CXX to one)"
        )
    return compiler


def _build_key(include_dir: Path, compiler: str) -> str:
    """A short hash of what the library depends on: its sources, the API header it is built
    against, the compiler and this CPU's model and flags (it is built with -march=native)."""
    description = f"{platform.machine()} {compiler} {include_dir}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                description += line
                break
    except OSError:
        pass
    digest = hashlib.sha256(description.encode())
    for source in [_SOURCE, *_HEADERS, include_dir / _API_HEADER]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _cache_dir() -> Path:
    """``DETRKIT_CACHE_DIR``, else ``detrkit`` in the user's cache directory."""
    if os.environ.get("DETRKIT_CACHE_DIR"):
        return Path(os.environ["DETRKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "detrkit"


@functools.cache
def onnxruntime_library() -> Path:
    """The path of detrkit's ONNX Runtime custom-op library, built on first use (a second or
    two) and cached per machine. Raises OnnxRuntimeLibraryError when it cannot be built."""
    include_dir = onnxruntime_include_dir()
    compiler = _compiler()
    directory = _cache_dir() / "onnxruntime_ops" / _build_key(include_dir, compiler)
    library = directory / _LIBRARY
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a process killed mid-build, or two building at
    # once, never leaves a partial library under the final name.
    handle, temporary = tempfile.mkstemp(prefix=f".{_LIBRARY}.", dir=directory)
    os.close(handle)
    command = [
        compiler,
        "-O3",
        "-march=native",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        f"-I{include_dir}",
        f"-I{_CSRC}",
        str(_SOURCE),
        "-o",
        temporary,
    ]
    try:
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            log = built.stderr.strip() or built.stdout.strip()
            raise OnnxRuntimeLibraryError(
                f"compiling detrkit's ONNX Runtime operators against {include_dir} failed:\n{log}"
            )
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return library

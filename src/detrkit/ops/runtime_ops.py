"""detrkit's operators for ONNX Runtime and OpenVINO: libraries built from
``csrc/onnxruntime_ops.cpp`` and ``csrc/openvino_ops.cpp`` on first use, compiled once per
machine and cached.

An export made with ``attention_op="detrkit"`` writes Deformable DETR's attention as one
``ai.detrkit::MultiScaleDeformableAttention`` node (see :mod:`detrkit.ops.ms_deform_attn_onnx`),
which each runtime runs with detrkit's library loaded::

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(str(detrkit.ops.onnxruntime_library()))

    core = openvino.Core()
    core.add_extension(str(detrkit.ops.openvino_extension()))

Both are compiled with the system's C++ compiler (``CXX``, else ``c++``) and ``-march=native``,
for this machine. ONNX Runtime's library needs ONNX Runtime's C API headers (1.17 or later),
found in ``ONNXRUNTIME_INCLUDE_DIR`` or the system's include directories (Debian 13 and later:
``apt-get install libonnxruntime-dev``); it links against nothing of ONNX Runtime's, so headers
of one version serve every runtime at least as new. OpenVINO's extension is built against the
headers and library of the installed ``openvino`` package, and serves that version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from detrkit.ops._extension import cpu_description

INCLUDE_VARIABLE = "ONNXRUNTIME_INCLUDE_DIR"

_CSRC = Path(__file__).parent / "csrc"
_ONNXRUNTIME_SOURCE = _CSRC / "onnxruntime_ops.cpp"
_OPENVINO_SOURCE = _CSRC / "openvino_ops.cpp"
_HEADERS = [_CSRC / "ms_deform_attn_sampling.h", _CSRC / "vector_lanes.h"]
_SYSTEM_INCLUDES = [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
_API_HEADER = "onnxruntime_c_api.h"


class RuntimeLibraryError(RuntimeError):
    """One of detrkit's runtime libraries cannot be built here; the message says why."""


def onnxruntime_include_dir() -> Path:
    """The directory of ONNX Runtime's C API headers: ``ONNXRUNTIME_INCLUDE_DIR`` when set, else
    the first system include directory that has them. Raises RuntimeLibraryError naming where it
    looked."""
    configured = os.environ.get(INCLUDE_VARIABLE)
    candidates = [Path(configured)] if configured else _SYSTEM_INCLUDES
    for directory in candidates:
        if (directory / _API_HEADER).is_file():
            return directory
    if configured:
        raise RuntimeLibraryError(
            f"{INCLUDE_VARIABLE}={configured} has no {_API_HEADER}: point it at the include "
            "directory of ONNX Runtime's C API headers"
        )
    looked = ", ".join(str(directory) for directory in candidates)
    raise RuntimeLibraryError(
        f"building detrkit's ONNX Runtime operators needs ONNX Runtime's C API headers, found in "
        f"none of {looked}: install them (Debian 13 or later: apt-get install libonnxruntime-dev) "
        f"or set {INCLUDE_VARIABLE} to their directory"
    )


def onnxruntime_library() -> Path:
    """The path of detrkit's ONNX Runtime custom-op library, built on first use (a second or
    two) and cached per machine. Raises RuntimeLibraryError when it cannot be built."""
    include_dir = onnxruntime_include_dir()
    return _build(
        "onnxruntime",
        _ONNXRUNTIME_SOURCE,
        # Only RegisterCustomOps is exported (the source marks it).
        flags=["-fvisibility=hidden", f"-I{include_dir}"],
        depends_on=[include_dir / _API_HEADER],
    )


def openvino_extension() -> Path:
    """The path of detrkit's OpenVINO extension library, built on first use (a few seconds) for
    the installed openvino package and cached per machine. Raises RuntimeLibraryError when it
    cannot be built."""
    try:
        import openvino
    except ImportError:
        raise RuntimeLibraryError(
            "detrkit's OpenVINO extension is built against the openvino package, which is not "
            "installed (pip install openvino)"
        ) from None
    root = Path(openvino.__file__).parent
    libraries = root / "libs"
    # The runtime's own library and TBB, whose threads the extension runs on.
    found = {name: sorted(libraries.glob(f"lib{name}.so.*")) for name in ("openvino", "tbb")}
    if not (root / "include" / "openvino").is_dir() or not all(found.values()):
        raise RuntimeLibraryError(
            f"the openvino package at {root} has no headers (include/) or no libopenvino and "
            "libtbb (libs/) to build detrkit's extension against"
        )
    links = [f"-l:{found['openvino'][0].name}", f"-l:{found['tbb'][0].name}"]
    return _build(
        "openvino",
        _OPENVINO_SOURCE,
        flags=[f"-I{root / 'include'}", f"-L{libraries}", *links, f"-Wl,-rpath,{libraries}"],
        depends_on=[found["openvino"][0]],
    )


def _build(runtime: str, source: Path, flags: list[str], depends_on: list[Path]) -> Path:
    """Compiles ``source`` into a shared library in the cache, unless a loadable one is there
    already; the cache key covers what the library depends on."""
    compiler = shlex.split(os.environ.get("CXX") or "c++")  # CXX may hold a launcher: ccache g++
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeLibraryError(
            f"building detrkit's {runtime} operators needs a C++ compiler; CXX="
            f"{os.environ.get('CXX') or 'c++'!r} is not on PATH (set CXX to one)"
        )
    name = f"libdetrkit_{runtime}.so"
    directory = _cache_dir() / f"{runtime}_ops" / _build_key(source, compiler, flags, depends_on)
    library = directory / name
    if library.is_file() and _loads(library):
        return library
    # Built under a temporary name and renamed: a process killed mid-build, or two building at
    # once, never leaves a partial library under the final name.
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(directory, name)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        os.close(handle)
    except OSError as error:
        raise RuntimeLibraryError(
            f"cannot write detrkit's {runtime} library into its cache {directory} "
            f"({error.strerror or error}); set DETRKIT_CACHE_DIR to a writable directory"
        ) from None
    command = [*compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
    command += [f"-I{_CSRC}", str(source), "-o", temporary, *flags]
    try:
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            log = built.stderr.strip() or built.stdout.strip() or "(no output)"
            raise RuntimeLibraryError(
                f"compiling detrkit's {runtime} operators failed (exit status "
                f"{built.returncode} of {shlex.join(command)}):\n{log}"
            )
        os.chmod(temporary, 0o755)  # a library, loadable by whoever shares the cache
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    if not _loads(library):
        raise RuntimeLibraryError(
            f"detrkit's {runtime} library {library} was built but does not load"
        )
    return library


def _loads(library: Path) -> bool:
    """Whether ``library`` loads as a shared library (a cached file can be cut short or
    damaged): loading it once here is what every runtime does with it anyway."""
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return False
    return True


# A temporary this old is a build that was killed: a build takes seconds.
_STALE_SECONDS = 600


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    for temporary in directory.glob(f".{name}.*"):
        try:
            if time.time() - temporary.stat().st_mtime > _STALE_SECONDS:
                temporary.unlink()
        except OSError:
            pass  # another process removed or renamed it first


def _build_key(source: Path, compiler: list[str], flags: list[str], depends_on: list[Path]) -> str:
    """A short hash of what a library depends on: its sources, the runtime's header or library
    it is built against, the compiler and flags, and this CPU's model and flags (it is built
    with -march=native, and a shared home directory can expose the cache to other machines)."""
    description = f"{cpu_description()} {compiler} {flags}"
    digest = hashlib.sha256(description.encode())
    for path in [source, *_HEADERS]:
        digest.update(path.read_bytes())
    for path in depends_on:
        # A runtime's library is large: its name, size and time stand for it.
        stat = path.stat()
        digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _cache_dir() -> Path:
    """``DETRKIT_CACHE_DIR``, else ``detrkit`` in the user's cache directory."""
    if os.environ.get("DETRKIT_CACHE_DIR"):
        return Path(os.environ["DETRKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "detrkit"

"""How detrkit writes files: whole or not at all, never through a link, a full disk named.

Every file detrkit writes goes through :func:`write_atomically` (or :func:`append_line` for logs
that grow). A reader, or a process killed mid-write, sees the previous file or the new one, never
half of one; a symbolic link placed where a result goes is replaced, not followed, so nothing
outside the output directory is touched; and a full disk or another failure to write is one
:class:`WriteError` naming the file, with the previous file left as it was.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Temporary files are named ".<target name>.<random>.tmp" beside their target.
_TEMPORARY_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (full disk, no permission...); the message names it and says
    that the previous file, if any, is intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # without OSError's "[Errno 28]" prefix


def describe_os_error(error: OSError) -> str:
    """A short reason for ``error`` ("the disk is full" for ENOSPC and EDQUOT)."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "the disk is full"
    return error.strerror or str(error)


@functools.cache
def _process_umask() -> int:
    # Reading the umask means setting it: done once, not while other threads may create files.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomically(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Calls ``write(tmp)`` to write a temporary file beside ``target``, fsyncs it and renames it
    over ``target``: the old file or the new one, never half of one, and a link at ``target`` is
    replaced rather than followed. Any failure, a full disk included (also one that C++ code
    inside ``write`` reports as a RuntimeError), raises :class:`WriteError` naming ``target``."""
    target = Path(target)
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=_TEMPORARY_SUFFIX
        )
    except OSError as error:
        raise WriteError(
            error.errno, f"cannot write {target}: {describe_os_error(error)}"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fault_point(target)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); the result gets a new file's usual mode.
        os.chmod(tmp, 0o666 & ~_process_umask())
        os.replace(tmp, target)
    except OSError as error:
        raise WriteError(
            error.errno,
            f"cannot write {target}: {describe_os_error(error)}"
            + ("; the previous file is intact" if os.path.lexists(target) else ""),
        ) from None
    except RuntimeError as error:  # torch.save and others report write failures so
        reason = "the disk is full" if _says_disk_full(str(error)) else str(error).splitlines()[0]
        raise WriteError(
            errno.EIO,
            f"cannot write {target}: {reason}"
            + ("; the previous file is intact" if os.path.lexists(target) else ""),
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


# The fault tests' hook: a process whose environment names a file here is killed (SIGKILL, no
# clean-up) when it has written that file's temporary and not yet renamed it.
KILL_AT_VARIABLE = "DETRKIT_TEST_KILL_AT"


def _fault_point(target: Path) -> None:
    if os.environ.get(KILL_AT_VARIABLE) == target.name:
        os.kill(os.getpid(), signal.SIGKILL)


def _says_disk_full(message: str) -> bool:
    lowered = message.lower()
    return "no space left" in lowered or "file write failed" in lowered or "enospc" in lowered


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``target`` atomically (see :func:`write_atomically`)."""
    return write_atomically(target, lambda tmp: tmp.write_text(text))


def write_json(target: str | os.PathLike, value: Any, indent: int | None = None) -> Path:
    """Writes ``value`` as JSON (and a final newline) to ``target`` atomically."""
    return write_text(target, json.dumps(value, indent=indent) + "\n")


def append_line(target: str | os.PathLike, line: str) -> None:
    """Appends ``line`` and a newline to ``target`` in one write, refusing to follow a link there
    (:class:`WriteError`)."""
    target = Path(target)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise WriteError(
                error.errno, f"cannot write {target}: it is a symbolic link, not a file"
            ) from None
        raise WriteError(
            error.errno, f"cannot write {target}: {describe_os_error(error)}"
        ) from None
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as error:
        raise WriteError(
            error.errno, f"cannot write {target}: {describe_os_error(error)}"
        ) from None
    finally:
        os.close(fd)


def remove_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Removes the temporary files that an interrupted :func:`write_atomically` left in
    ``directory`` (those of target ``name`` only, when given); returns them. Only call it where
    no other process is writing the same files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".{name}.*{_TEMPORARY_SUFFIX}" if name else f".*{_TEMPORARY_SUFFIX}"
    removed = []
    for path in directory.glob(pattern):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def existing_results(paths: list[Path], option: str, overwrite: bool) -> list[Path]:
    """The results among ``paths`` that exist already (links included). Unless ``overwrite``,
    raises FileExistsError naming them, ``option`` (the place they were asked for, e.g.
    "--out runs/x") and how to replace them: an earlier result is never replaced unasked."""
    found = [path for path in paths if os.path.lexists(path)]
    if found and not overwrite:
        names = ", ".join(path.name for path in found)
        raise FileExistsError(
            f"{option}: holds earlier results ({names}); choose another place or give "
            "--overwrite (overwrite=True) to replace them"
        )
    return found

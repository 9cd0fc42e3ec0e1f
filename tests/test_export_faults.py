"""Bad input and failing disks for exports: one clear error, nothing half written, nothing
replaced unasked, nothing written through a link. Most tests replace the tracing with a stub
(tests/test_export.py checks real exports); what they check runs for real."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import detrkit
import detrkit.deploy as deploy
from detrkit.checkpoints import NonFiniteError
from detrkit.cli.main import main
from detrkit.deploy import ExportError
from detrkit.files import WriteError
from helpers import needs_onnx, tiny_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny DETR saved as is, and one with a NaN weight."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = tiny_model("detr")
    detrkit.save(model, folder / "good")
    with torch.no_grad():
        model.class_embed.weight[0, 0] = float("nan")
    detrkit.save(model, folder / "nan")
    return {"good": folder / "good", "nan": folder / "nan"}


@pytest.fixture
def stub_export(monkeypatch):
    """Tracing writes a few bytes instead of a model, and verification passes: the tests see
    how the file is written, not what it holds."""

    def trace(graph, format, size, opset, metadata, attention_op):
        return lambda target: target.write_bytes(b"the new export")

    monkeypatch.setattr(deploy, "_trace", trace)
    monkeypatch.setattr(
        deploy, "verify_file", lambda *args: {"pred_logits": 0.0, "pred_boxes": 0.0}
    )


def _prepare(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "earlier.onnx").write_bytes(b"an earlier export")


# (options after `detrkit export`, what the one line of error must say). {good}, {nan}: the
# checkpoints; {tmp}: the test's folder, which holds empty/, bad.pth and earlier.onnx.
GOOD = ["--weights", "{good}"]
OUT = ["--out", "{tmp}/m.onnx"]
BAD_OPTIONS = {
    "weights-missing": (["--weights", "{tmp}/missing.pth", *OUT], r"missing\.pth: no such file"),
    "weights-dir-without-config": (["--weights", "{tmp}/empty", *OUT], "empty: unknown format"),
    "weights-corrupt": (["--weights", "{tmp}/bad.pth", *OUT], r"bad\.pth: not a readable"),
    "weights-nan": (["--weights", "{nan}", *OUT], "--weights .*nan: .*NaN or infinity"),
    "weights-absent": (OUT, "arguments are required: --weights"),
    "out-exists": (
        [*GOOD, "--out", "{tmp}/earlier.onnx"],
        r"--out .*earlier\.onnx already exists; pass --overwrite",
    ),
    "out-missing-dir": ([*GOOD, "--out", "{tmp}/no/m.onnx"], "--out .*no does not exist"),
    "out-directory": ([*GOOD, "--out", "{tmp}/empty"], "--out .*empty is a directory"),
    "format-mismatch": (
        [*GOOD, *OUT, "--format", "torch"],
        r"--format torch writes a \.pt2 file, but --out .*m\.onnx ends in \.onnx",
    ),
    "format-unknown": ([*GOOD, *OUT, "--format", "tflite"], "argument --format: invalid choice"),
    "opset-too-old": ([*GOOD, *OUT, "--opset", "11"], "--opset 11 is too old.*18 or later"),
    "opset-too-new": ([*GOOD, *OUT, "--opset", "99"], "--opset 99 is too new.*18 to 22"),
    "opset-not-a-number": ([*GOOD, *OUT, "--opset", "x"], "argument --opset: invalid int"),
    "size-too-small": (
        [*GOOD, *OUT, "--size", "32", "64"],
        "--size 32 64 is too small.*at least 33 pixels.*33x33",
    ),
    "size-zero": ([*GOOD, *OUT, "--size", "0", "0"], "argument --size: must be a positive"),
    "size-negative": ([*GOOD, *OUT, "--size", "-5", "64"], "argument --size: must be a positive"),
    "size-one-number": ([*GOOD, *OUT, "--size", "64"], "argument --size: expected 2 arguments"),
    "tolerance-zero": ([*GOOD, *OUT, "--tolerance", "0"], "argument --tolerance: must be a fin"),
    "tolerance-nan": ([*GOOD, *OUT, "--tolerance", "nan"], "argument --tolerance: must be a fin"),
    "tolerance-inf": ([*GOOD, *OUT, "--tolerance", "inf"], "argument --tolerance: must be a fin"),
    "tolerance-text": ([*GOOD, *OUT, "--tolerance", "tiny"], "argument --tolerance: must be a num"),
}


def run_cli(argv: list[str]) -> int:
    """main's exit status, including argparse's SystemExit."""
    try:
        return main(["export", *argv])
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize(("argv", "says"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_every_bad_option_is_one_line_naming_it(tmp_path, capsys, checkpoints, argv, says):
    """Refused before any tracing: one line, the option or file and the problem, exit 2, no
    traceback, nothing written."""
    _prepare(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    values = {"good": checkpoints["good"], "nan": checkpoints["nan"], "tmp": tmp_path}
    assert run_cli([arg.format(**values) for arg in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("detrkit: error: "), err
    assert __import__("re").search(says, lines[0]), lines[0]
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "earlier.onnx").read_bytes() == b"an earlier export"


def test_a_link_at_out_is_replaced_never_followed(tmp_path, capsys, checkpoints, stub_export):
    """--out is a link to a file elsewhere: refused without --overwrite; with it the link
    becomes the export and the file it pointed to is untouched."""
    victim = tmp_path / "elsewhere" / "victim.onnx"
    victim.parent.mkdir()
    victim.write_bytes(b"someone else's file")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    out.symlink_to(victim)
    argv = ["--weights", str(checkpoints["good"]), "--out", str(out)]
    assert run_cli(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.is_symlink()
    assert run_cli([*argv, "--overwrite"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert not out.is_symlink() and out.read_bytes() == b"the new export"
    assert victim.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]


def test_stale_temporaries_of_the_target_are_removed(tmp_path, stub_export):
    """An export killed mid-write leaves its temporary file; the next export to the same file
    removes it, and only it."""
    stale = tmp_path / ".m.onnx.k3j9x2ab.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".other.onnx.a8b7c6d5.tmp"  # another file's, maybe being written now
    other.write_bytes(b"y")
    detrkit.export(tiny_model("detr"), tmp_path / "m.onnx", size=(64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "m.onnx"]


def _full_disk(file_or_path, *args, **kwargs) -> None:
    """A save that writes part of its file, then finds the disk full."""
    if isinstance(file_or_path, (str, os.PathLike)):
        Path(file_or_path).write_bytes(b"half an exp")
    else:
        file_or_path.write(b"half an exp")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("format", [pytest.param("onnx", marks=needs_onnx), "torch"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, format):
    """The real save functions (onnx_ir.save, torch.export.save) write through
    write_atomically: a full disk is one WriteError naming the file, the previous export stays,
    and no temporary file is left."""
    import onnx_ir

    if format == "onnx":
        monkeypatch.setattr(deploy, "export_onnx", lambda *args: "a traced model")
        monkeypatch.setattr(onnx_ir, "save", lambda model, path, **kw: _full_disk(path))
    else:
        monkeypatch.setattr(deploy, "export_program", lambda *args: "a traced program")
        monkeypatch.setattr(torch.export, "save", lambda program, file, **kw: _full_disk(file))
    path = tmp_path / ("m.onnx" if format == "onnx" else "m.pt2")
    path.write_bytes(b"the previous export")
    with pytest.raises(WriteError, match=f"{path.name}: the disk is full; the previous file is"):
        detrkit.export(tiny_model("detr"), path, format, size=(64, 64), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == b"the previous export"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_program_written_to_a_full_disk_is_an_os_error():
    """torch's zip writer, writing to a file that fails, aborts the process when it is
    destroyed: save_program builds the archive in memory and writes it from Python."""
    from detrkit.deploy.to_program import save_program

    program = torch.export.export(torch.nn.Linear(64, 64), (torch.randn(2, 64),))
    with pytest.raises(OSError) as raised:
        save_program(program, Path("/dev/full"), {"preset": "none"})
    assert raised.value.errno == errno.ENOSPC
    del program
    __import__("gc").collect()  # the process survives the writer's end


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, capsys, checkpoints, monkeypatch):
    monkeypatch.setattr(deploy, "_trace", lambda *args: _full_disk)
    out = tmp_path / "m.pt2"
    assert run_cli(["--weights", str(checkpoints["good"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"detrkit: error: cannot write {out}: the disk is full"
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_refused_before_tracing(tmp_path):
    model = tiny_model("detr")
    with torch.no_grad():
        model.bbox_embed.layers[0].bias[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"m\.onnx: the model's weights hold NaN or inf"):
        detrkit.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_reference_outputs_are_refused(tmp_path, monkeypatch):
    """Finite weights whose outputs overflow: nothing to verify the export against, and nothing
    is kept (verification runs for real, on the stub's file)."""
    monkeypatch.setattr(deploy, "_trace", lambda *args: lambda target: target.write_bytes(b"x"))
    model = tiny_model("detr")
    with torch.no_grad():
        model.class_embed.weight.fill_(3e38)  # finite, but the logits overflow
    with pytest.raises(NonFiniteError, match=r"own outputs hold NaN or infinity \(pred_logits"):
        detrkit.export(model, tmp_path / "m.pt2", "torch", size=(64, 64))
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_an_existing_file_unasked(tmp_path, stub_export):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match=r"m\.onnx already exists; pass overwrite=True"):
        detrkit.export(tiny_model("detr"), path, size=(64, 64))
    assert path.read_bytes() == b"an earlier export"
    detrkit.export(tiny_model("detr"), path, size=(64, 64), overwrite=True)
    assert path.read_bytes() == b"the new export"

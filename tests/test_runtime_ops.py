"""detrkit's operators for ONNX Runtime and OpenVINO: the libraries' build, the node against the
reference in each runtime, and exports that use it."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detrkit
from detrkit.cli.main import main
from detrkit.deploy import ExportedModel, ExportError
from detrkit.ops import ONNX_DOMAIN, RuntimeLibraryError, ms_deform_attn_reference
from detrkit.ops import runtime_ops as library_module
from detrkit.ops.runtime_ops import onnxruntime_library, openvino_extension
from helpers import (
    ATTENTION_CASES,
    BAD_INPUTS,
    FOUR_LEVELS,
    assert_close_fp32,
    make_inputs,
    needs_onnx,
    tiny_model,
)

pytestmark = needs_onnx

NAMES = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
TYPES = [torch.float32, torch.int64, torch.int64, torch.float32, torch.float32]


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """The libraries built into an empty cache."""
    monkeypatch.setenv("DETRKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def attention_file(path: Path) -> Path:
    """An ONNX file of one ai.detrkit::MultiScaleDeformableAttention node, every axis dynamic."""
    import onnx
    from onnx import TensorProto, helper

    ranks = {"value": 4, "sampling_locations": 6, "attention_weights": 5}
    inputs = [
        helper.make_tensor_value_info(
            name,
            TensorProto.INT64 if name not in ranks else TensorProto.FLOAT,
            [f"{name}_{axis}" for axis in range(ranks.get(name, 2 if name[0] == "s" else 1))],
        )
        for name in NAMES
    ]
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "Lq", "C"])
    node = helper.make_node("MultiScaleDeformableAttention", NAMES, ["output"], domain=ONNX_DOMAIN)
    graph = helper.make_graph([node], "attention", inputs, [output])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, 1)]
    )
    onnx.save(model, path)
    return path


def onnxruntime_runner(path: Path):
    """Runs ``path`` in ONNX Runtime with detrkit's library loaded, as ExportedModel loads it."""
    import onnxruntime

    from detrkit.deploy.runtime import onnxruntime_options

    options = onnxruntime_options(path, threads=2)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def openvino_runner(path: Path):
    """Runs ``path`` in OpenVINO's CPU plugin, in fp32, with detrkit's extension loaded."""
    import openvino

    core = openvino.Core()
    core.add_extension(str(openvino_extension()))
    properties = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", properties)
    request = compiled.create_infer_request()
    return lambda feeds: list(request.infer(feeds).values())


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


@pytest.fixture(scope="module", params=list(RUNNERS))
def attention_session(request, tmp_path_factory):
    """The attention node in each runtime, as a function of ms_deform_attn's inputs."""
    path = attention_file(tmp_path_factory.mktemp("attention") / "attention.onnx")
    run = RUNNERS[request.param](path)

    def attention(inputs):
        return torch.from_numpy(run({name: t.numpy() for name, t in zip(NAMES, inputs)})[0])

    attention.runtime = request.param
    return attention


@pytest.mark.parametrize(
    "case",
    [
        *ATTENTION_CASES,
        # More queries than one task of 16 holds, a batch of 3, and locations on every level.
        "many_queries",
        "one_query",
    ],
)
def test_the_node_equals_the_reference(attention_session, case):
    options = {
        "many_queries": dict(spatial_shapes=FOUR_LEVELS, channels=32, batch=3, queries=53),
        "one_query": dict(spatial_shapes=FOUR_LEVELS, channels=8, batch=1, queries=1, points=1),
    }.get(case) or ATTENTION_CASES[case]
    inputs = make_inputs(**options)
    assert_close_fp32(attention_session(inputs), ms_deform_attn_reference(*inputs), "output")


def test_a_nan_location_gives_nan_as_the_reference_does(attention_session):
    inputs = list(make_inputs(FOUR_LEVELS, channels=32))
    inputs[3] = inputs[3].clone()
    inputs[3][0, 2, 1, 0, 0, 0] = float("nan")
    actual = attention_session(inputs)
    expected = ms_deform_attn_reference(*inputs)
    assert actual.isnan().equal(expected.isnan()) and actual.isnan().any()
    assert_close_fp32(actual.nan_to_num(), expected.nan_to_num(), "output")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_inputs_it_cannot_take_are_errors_naming_the_input(attention_session, case):
    """Every input of a shape the PyTorch op refuses, the node refuses with detrkit's message
    naming the input (nothing is read out of bounds). Feeds of another rank or type than the
    graph's inputs are the runtime's to refuse: ONNX Runtime does, OpenVINO refuses another rank
    and converts another type, after which the node computes what the reference does."""
    corrupt, name = BAD_INPUTS[case]
    inputs = corrupt(make_inputs(FOUR_LEVELS))
    if "dtype" in case or "integer" in case:
        if attention_session.runtime == "openvino":
            expected = [t.to(dtype) for t, dtype in zip(inputs, TYPES)]
            actual = attention_session(inputs)
            assert_close_fp32(actual, ms_deform_attn_reference(*expected), "output")
            return
        name = "type"
    elif "rank" in case:
        name = f"{name}|dimensions"
    # ONNX Runtime raises its own exception classes, OpenVINO RuntimeError.
    with pytest.raises(Exception, match=name):
        attention_session(inputs)


@pytest.mark.parametrize("height, width", [(2**33, 2**31), (2**62, 4), (3, 2**62)])
def test_level_sizes_whose_area_overflows_are_refused(attention_session, height, width):
    """Areas past int64's range (which wrap to 0, the positions of an empty value) are errors,
    not reads out of bounds."""
    value = torch.zeros(1, 0, 1, 8)
    locations = torch.full((1, 2, 1, 1, 1, 2), 0.3)
    weights = torch.ones(1, 2, 1, 1, 1)
    shapes, starts = torch.tensor([[height, width]]), torch.tensor([0])
    with pytest.raises(Exception, match="spatial_shapes"):
        attention_session([value, shapes, starts, locations, weights])


def test_the_library_is_built_once_and_keyed_on_its_sources(fresh_library, tmp_path, monkeypatch):
    first = onnxruntime_library()
    assert first.is_file() and first.is_relative_to(fresh_library)
    built = first.stat().st_mtime_ns
    assert onnxruntime_library() == first  # found in the cache, not rebuilt
    assert first.stat().st_mtime_ns == built
    assert first.stat().st_mode & 0o777 == 0o755  # loadable by whoever shares the cache
    # A changed source builds a library of its own beside the first.
    source = tmp_path / "onnxruntime_ops.cpp"
    shutil.copy(library_module._ONNXRUNTIME_SOURCE, source)
    source.write_text(source.read_text() + "\n// changed\n")
    monkeypatch.setattr(library_module, "_ONNXRUNTIME_SOURCE", source)
    second = onnxruntime_library()
    assert second != first and second.is_file() and first.is_file()
    # Only the libraries, no temporaries.
    assert sorted(p.name for p in fresh_library.rglob("*") if p.is_file()) == [first.name] * 2


@pytest.mark.parametrize(
    "build",
    # (OpenVINO's in the full run: each case starts two Python processes, about 15 s.)
    ["onnxruntime_library", pytest.param("openvino_extension", marks=pytest.mark.full)],
)
def test_a_damaged_cached_library_is_built_again(fresh_library, build):
    """A process that finds the cached library damaged (cut short, say) builds it again. Run in
    new processes: dlopen hands a process a library it has loaded by its name, without reading
    the file again."""

    def library_of_a_new_process() -> Path:
        script = f"from detrkit.ops import {build}; print({build}())"
        found = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        return Path(found.stdout.strip().splitlines()[-1])

    library = library_of_a_new_process()
    damaged = library.with_name("damaged")
    damaged.write_bytes(b"cut short")
    os.replace(damaged, library)
    assert library_of_a_new_process() == library
    assert library.read_bytes()[:4] == b"\x7fELF"
    ctypes.CDLL(str(library))  # a shared library again


def test_a_killed_builds_temporary_is_removed_by_the_next_build(fresh_library, monkeypatch):
    library = onnxruntime_library()
    stale = library.parent / f".{library.name}.abc123"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))  # long ago
    fresh = library.parent / f".{library.name}.def456"  # a build under way elsewhere
    fresh.write_bytes(b"")
    library.unlink()
    onnxruntime_library()
    assert not stale.exists() and fresh.exists()


def test_a_failed_build_leaves_nothing_and_says_why(fresh_library, tmp_path, monkeypatch):
    source = tmp_path / "onnxruntime_ops.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setattr(library_module, "_ONNXRUNTIME_SOURCE", source)
    with pytest.raises(RuntimeLibraryError, match=r"failed \(exit status 1 of .*\):\n.*error"):
        onnxruntime_library()
    assert not [p for p in fresh_library.rglob("*") if p.is_file()]
    monkeypatch.setenv("CXX", "false")  # fails without a word
    with pytest.raises(RuntimeLibraryError, match=r"exit status 1 of false .*\):\n\(no output\)"):
        onnxruntime_library()


def test_a_compiler_behind_a_launcher_and_an_unwritable_cache(fresh_library, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", f"env {os.environ.get('CXX') or 'c++'}")  # as "ccache g++"
    assert onnxruntime_library().is_file()
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("DETRKIT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(RuntimeLibraryError, match=r"into its cache .*set DETRKIT_CACHE_DIR"):
        onnxruntime_library()


def test_missing_headers_or_compiler_are_named(fresh_library, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(RuntimeLibraryError, match=f"ONNXRUNTIME_INCLUDE_DIR={tmp_path} has no"):
        onnxruntime_library()
    monkeypatch.delenv("ONNXRUNTIME_INCLUDE_DIR")
    monkeypatch.setattr(library_module, "_SYSTEM_INCLUDES", [tmp_path / "none"])
    with pytest.raises(RuntimeLibraryError, match="apt-get install libonnxruntime-dev"):
        onnxruntime_library()
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(library_module, "onnxruntime_include_dir", lambda: tmp_path)
    with pytest.raises(RuntimeLibraryError, match="CXX='no-such-compiler' is not on PATH"):
        onnxruntime_library()


def test_an_export_with_detrkits_node_runs_and_equals_pytorch(tmp_path):
    import onnx

    model = tiny_model("deformable")
    path = tmp_path / "deformable.onnx"
    result = detrkit.export(model, path, size=(96, 128), attention_op="detrkit")
    assert max(result.differences.values()) <= 1e-4
    graph = onnx.load(path)
    nodes = [(node.domain, node.op_type) for node in graph.graph.node]
    # One node per attention: the encoder's and decoder's layers, no GridSample left.
    layers = model.config.enc_layers + model.config.dec_layers
    assert nodes.count((ONNX_DOMAIN, "MultiScaleDeformableAttention")) == layers
    assert ("", "GridSample") not in nodes
    assert_runs_as_pytorch(model, ExportedModel(path), openvino_runner(path))


def assert_runs_as_pytorch(model, exported: ExportedModel, openvino=None) -> None:
    """The file in ONNX Runtime (ExportedModel, detrkit's library loaded) and, given its runner,
    OpenVINO, within 1e-4 of PyTorch at batch 1 and at a padded batch of 3 at other sizes."""
    for batch, size in [(1, (80, 100)), (3, (131, 147))]:
        images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        mask = torch.zeros(batch, *size, dtype=torch.bool)
        mask[0, size[0] // 2 :] = True
        with torch.no_grad():
            expected = model(images, mask)
        results = [("onnxruntime", exported(images=images, mask=mask))]
        if openvino is not None:
            in_openvino = openvino({"images": images.numpy(), "mask": mask.numpy()})
            outputs = dict(zip(exported.output_names, map(torch.from_numpy, in_openvino)))
            results.append(("openvino", outputs))
        for runtime, actual in results:
            for name in ("pred_logits", "pred_boxes"):
                difference = (actual[name] - expected[name]).abs().max()
                assert difference <= 1e-4, (runtime, name, batch, difference)


def test_a_file_with_detrkits_node_where_the_library_cannot_be_built(
    fresh_library, tmp_path, monkeypatch, capsys
):
    path = attention_file(tmp_path / "attention.onnx")
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(
        ExportError,
        match=rf"^{re.escape(str(path))} has detrkit's own {ONNX_DOMAIN} nodes.*nowhere",
    ):
        ExportedModel(path)
    # The export asks for the library before tracing, to verify with, and says how to go on.
    model = tiny_model("deformable")
    with pytest.raises(
        ExportError, match=r"attention_op detrkit: the export cannot be verified.*verify=False"
    ):
        detrkit.export(model, tmp_path / "m.onnx", attention_op="detrkit")
    assert not (tmp_path / "m.onnx").exists()
    # So does the command line, before reading more than the checkpoint; --no-verify writes it.
    detrkit.save(model, tmp_path / "checkpoint")
    argv = ["export", "--weights", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "m.onnx")]
    argv += ["--attention-op", "detrkit", "--size", "96", "128"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--attention-op detrkit: the export cannot be verified" in error
    assert "pass --no-verify" in error and "Traceback" not in error
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.full
def test_no_verify_writes_the_node_export_without_onnxruntimes_headers(
    fresh_library, tmp_path, monkeypatch, capsys
):
    """(Full: one more export, about 20 s.) The file --no-verify writes runs as PyTorch does
    where the library can be built."""
    headers = os.environ.get("ONNXRUNTIME_INCLUDE_DIR")
    model = tiny_model("deformable")
    detrkit.save(model, tmp_path / "checkpoint")
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(tmp_path / "nowhere"))
    argv = ["export", "--weights", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "m.onnx")]
    argv += ["--attention-op", "detrkit", "--size", "96", "128", "--no-verify"]
    assert main(argv) == 0
    assert "verified" not in capsys.readouterr().out
    if headers is None:
        monkeypatch.delenv("ONNXRUNTIME_INCLUDE_DIR")
    else:
        monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", headers)
    assert_runs_as_pytorch(model, ExportedModel(tmp_path / "m.onnx"))


def test_openvinos_extension_needs_the_package_and_its_headers(
    fresh_library, tmp_path, monkeypatch
):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeLibraryError, match=r"not installed \(pip install openvino\)"):
        openvino_extension()
    bare = types.ModuleType("openvino")
    bare.__file__ = str(tmp_path / "openvino" / "__init__.py")
    monkeypatch.setitem(sys.modules, "openvino", bare)
    with pytest.raises(RuntimeLibraryError, match="has no headers"):
        openvino_extension()
    assert not fresh_library.exists()


def test_attention_op_values_that_would_change_nothing_are_refused(tmp_path, capsys):
    deformable = tiny_model("deformable")
    with pytest.raises(ValueError, match="attention_op must be one of gridsample, detrkit, got"):
        detrkit.export(deformable, tmp_path / "m.onnx", attention_op="grid")
    with pytest.raises(ValueError, match="is for ONNX exports, not 'torch'"):
        detrkit.export(deformable, tmp_path / "m.pt2", "torch", attention_op="detrkit")
    with pytest.raises(ValueError, match="a detr model has none"):
        detrkit.export(tiny_model("detr"), tmp_path / "m.onnx", attention_op="detrkit")
    assert list(tmp_path.iterdir()) == []
    detrkit.save(deformable, tmp_path / "checkpoint")
    argv = ["export", "--weights", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "m.pt2")]
    assert main([*argv, "--attention-op", "detrkit"]) == 2
    assert "--attention-op detrkit is for ONNX exports" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--attention-op", "grid"])
    assert "--attention-op: invalid choice: 'grid'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

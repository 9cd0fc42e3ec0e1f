"""Deployment: ONNX and torch.export files that compute what PyTorch computes, at any size."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import detrkit
from detrkit.cli.main import main
from detrkit.deploy import ExportedModel, ExportError
from detrkit.deploy.graph import ExportedDetector
from detrkit.deploy.sizes import check_export_size
from detrkit.deploy.verify import compare, pytorch_outputs, verification_checks, verify_file
from detrkit.models.backbone import resize_mask
from detrkit.ops import ms_deform_attn_portable, ms_deform_attn_reference
from helpers import EXPORT_MODELS, EXPORT_TINY, needs_onnx, tiny_model, tiny_panoptic_model

EXPORT_SIZE = (96, 128)  # traced with a batch of 2
# Checked at batch sizes and image sizes that are not the export's (nor multiples of 32).
CHECKS = [(1, (80, 100)), (3, (131, 147))]
TOLERANCE = 1e-4
# The pair `make test` runs; the rest are marked full (each export traces for 20-90 s on a CPU)
# and run by `make test-full`. DETR's ONNX export is checked the same way by the command-line
# test below, which `make test` runs.
FAST = {("deformable_two_stage", "torch")}


def batch(size: tuple[int, int], count: int, padded: bool, seed: int = 0):
    """Normalised images and their mask; with ``padded``, the first image is a smaller one
    padded at the bottom and the right, as pad_images pads a batch of different sizes."""
    height, width = size
    images = torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(count, height, width, dtype=torch.bool)
    if padded:
        mask[0, height - height // 3 :] = True
        mask[0, :, width - width // 4 :] = True
        images = images.masked_fill(mask[:, None], 0.0)
    return images, mask


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports each (model, format, options) once for the whole module."""
    cache = {}

    def get(name: str, format: str, **options) -> tuple[torch.nn.Module, Path]:
        key = (name, format, tuple(sorted(options.items())))
        if key not in cache:
            model = tiny_model(name)
            suffix = "onnx" if format == "onnx" else "pt2"
            path = tmp_path_factory.mktemp("exports") / f"{name}.{suffix}"
            detrkit.export(model, path, format, size=EXPORT_SIZE, **options)
            cache[key] = model, path
        return cache[key]

    return get


def assert_matches_pytorch(
    model, exported: ExportedModel, with_mask: bool = True, outputs=("pred_logits", "pred_boxes")
) -> None:
    """Every check size and batch, with and without padding: within TOLERANCE of PyTorch."""
    for count, size in CHECKS:
        for padded in (False, True) if with_mask else (False,):
            images, mask = batch(size, count, padded)
            with torch.no_grad():
                expected = model(images, mask if with_mask else None)
            inputs = {"images": images, "mask": mask} if with_mask else {"images": images}
            actual = exported(**inputs)
            for name in outputs:
                assert actual[name].shape == expected[name].shape, (name, count, size)
                difference = (actual[name] - expected[name]).abs().max().item()
                assert difference <= TOLERANCE, (name, count, size, padded, difference)


def _marks(name: str, format: str) -> list:
    marks = [needs_onnx] if format == "onnx" else []
    return marks if (name, format) in FAST else [*marks, pytest.mark.full]


@pytest.mark.parametrize(
    ("name", "format"),
    [
        pytest.param(name, format, marks=_marks(name, format), id=f"{name}-{format}")
        for name in EXPORT_MODELS
        for format in ("onnx", "torch")
    ],
)
def test_export_matches_pytorch_at_other_sizes(exports, name, format):
    model, path = exports(name, format)
    exported = open_and_check_interface(path, format)
    if format == "torch" and name != "detr" and detrkit.ops.fused_kernel_available():
        # Deformable DETR's fused attention op stays one node of the program.
        targets = {str(node.target) for node in exported.program.graph.nodes}
        assert "detrkit.ms_deform_attn_forward.default" in targets
        # Its sampling locations in the fast module's form, whole rows of L * P * 2 numbers at
        # once (which ONNX Runtime runs several times faster than the reference's broadcasts).
        assert "aten.addcdiv.default" in targets
    assert_matches_pytorch(model, exported)


def open_and_check_interface(path: Path, format: str) -> ExportedModel:
    """The exported file, after checking its inputs and outputs and, for ONNX, that it uses
    standard operators only: no custom domain, no local functions."""
    exported = ExportedModel(path)
    assert exported.format == format
    assert exported.input_names == ["images", "mask"]
    assert exported.output_names == ["pred_logits", "pred_boxes"]
    if format == "onnx":
        import onnx

        graph = onnx.load(path)
        assert {node.domain for node in graph.graph.node} == {""} and not graph.functions
    return exported


@pytest.mark.full
@pytest.mark.parametrize("name", ["deformable_two_stage"])
def test_torch_program_runs_with_torch_export_load(exports, name):
    """The .pt2 is a plain torch.export archive: torch.export.load alone runs it, without
    ExportedModel's metadata. (The fused attention op in its graph is checked above, in the tests
    `make test` runs; loading takes 5 s.)"""
    model, path = exports(name, "torch")
    program = torch.export.load(path)
    images, mask = batch(CHECKS[1][1], 3, padded=True)
    logits, boxes = program.module()(images, mask)
    with torch.no_grad():
        expected = model(images, mask)
    assert (logits - expected["pred_logits"]).abs().max() <= TOLERANCE
    assert (boxes - expected["pred_boxes"]).abs().max() <= TOLERANCE


@needs_onnx
def test_cli_exports_verifies_and_records_metadata(tmp_path, capsys):
    """`detrkit export` on a checkpoint at the smallest size DETR takes: verified on its own,
    dynamic axes named, metadata set, and it computes what PyTorch computes at other sizes."""
    import onnx

    model = tiny_model("detr")
    model.config.class_names = ["cat", "dog", "bird"]
    detrkit.save(model, tmp_path / "checkpoint")
    out = tmp_path / "detr.onnx"
    argv = ["export", "--weights", str(tmp_path / "checkpoint"), "--out", str(out)]
    # DETR's smallest export size (its stride-32 map 2x2): the file still takes every size.
    assert main([*argv, "--size", "33", "33"]) == 0
    printed = capsys.readouterr().out
    # At the export's size (another batch than the 2 traced with) and at a larger size.
    assert "verified with ONNX Runtime on a batch of 1 at 33x33 and a batch of 3 at" in printed
    assert "pred_logits" in printed

    graph = onnx.load(out)
    assert graph.opset_import[0].version == 18
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.graph.input, *graph.graph.output]
    }
    assert dims["images"] == ["batch", 3, "height", "width"]
    assert dims["mask"] == ["batch", "height", "width"]
    assert dims["pred_logits"] == ["batch", 5, 4]
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert metadata["detrkit_version"] == detrkit.__version__
    assert metadata["preset"] == "detr_digits" and metadata["model_type"] == "detr"
    assert json.loads(metadata["class_names"]) == ["cat", "dog", "bird"]
    assert json.loads(metadata["image_mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["image_std"]) == [0.229, 0.224, 0.225]
    assert json.loads(metadata["config"])["num_queries"] == 5

    exported = open_and_check_interface(out, "onnx")
    assert_matches_pytorch(detrkit.load(tmp_path / "checkpoint"), exported)


@pytest.mark.full
def test_export_of_a_model_optimized_for_inference(tmp_path):
    """optimize_for_inference's copy (batch norm folded, channels-last, chunked encoder MLP)
    exports too, and computes what the model it came from computes."""
    model = tiny_model("deformable")
    optimized = detrkit.optimize_for_inference(model)
    detrkit.export(optimized, tmp_path / "optimized.pt2", "torch", size=EXPORT_SIZE)
    assert_matches_pytorch(model, ExportedModel(tmp_path / "optimized.pt2"))


@pytest.mark.full
@needs_onnx
def test_export_without_mask_input(exports):
    model, path = exports("detr", "onnx", with_mask=False)
    exported = ExportedModel(path)
    assert exported.input_names == ["images"]
    assert_matches_pytorch(model, exported, with_mask=False)


@pytest.mark.full
@pytest.mark.parametrize(
    ("name", "format"),
    [
        pytest.param("detr", "onnx", marks=needs_onnx),
        pytest.param("deformable_two_stage", "onnx", marks=needs_onnx),
        ("deformable", "torch"),
    ],
)
def test_postprocess_graph_gives_the_detectors_detections(exports, name, format):
    """Images of three sizes through detrkit.Detector (resize, normalise, pad, model,
    PostProcess) and through the exported graph fed Detector's preprocessed batch."""
    model, path = exports(name, format, with_postprocess=True, num_select=12)
    detector = detrkit.Detector(model, threshold=0.0, size=90, max_size=150, device="cpu")
    detector.postprocess.num_select = 12
    generator = torch.Generator().manual_seed(3)
    pixels = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        for h, w in [(120, 160), (200, 150), (90, 90)]
    ]
    found, _ = detector.detect(pixels)
    images, mask = detector.preprocess(pixels)
    orig_sizes = torch.tensor([list(p.shape[-2:]) for p in pixels])
    actual = ExportedModel(path)(images=images, mask=mask, orig_sizes=orig_sizes)
    expected = {
        "scores": torch.stack([d.scores for d in found]),
        "labels": torch.stack([d.labels for d in found]),
        "boxes": torch.stack([d.boxes for d in found]),
    }
    assert actual["labels"].dtype == torch.int64
    # Detector lists detections by score; DETR's graph, like PostProcess, by query.
    order = actual["scores"].argsort(dim=1, descending=True, stable=True)  # [B, K]
    actual = {
        name: value.gather(1, order.view(*order.shape, *[1] * (value.dim() - 2)).expand_as(value))
        for name, value in actual.items()
    }
    differences = compare(expected, actual, TOLERANCE, orig_sizes)
    assert differences["labels"] == 0 and differences["scores"] <= TOLERANCE


@pytest.mark.full
@needs_onnx
def test_demo_model_export_keeps_its_detections(tmp_path):
    """The demo's Deformable DETR (make demo) exported with post-processing finds what
    detrkit.Detector finds on the digits validation images. Uses the trained demo checkpoint
    when there is one (DETRKIT_DEMO_CHECKPOINT or runs/demo/checkpoint.pth); otherwise the
    demo's architecture with random weights, as CI cannot train it first."""
    from detrkit.data.digits import DigitsDetection

    demo = Path(os.environ.get("DETRKIT_DEMO_CHECKPOINT", "runs/demo/checkpoint.pth"))
    trained = demo.exists()
    if trained:
        model = detrkit.load(demo)
    else:
        torch.manual_seed(0)
        model = detrkit.build_model("deformable_detr_digits", two_stage=True, dropout=0.0).eval()
    path = tmp_path / "demo.onnx"
    detrkit.export(model, path, with_postprocess=True, size=(120, 160))
    # The demo validates at image_scale 0.2 of the original 800 / 1333. Threshold 0: every
    # detection of each image is compared, not only the confident ones.
    detector = detrkit.Detector(model, threshold=0.0, size=160, max_size=266, device="cpu")
    exported = ExportedModel(path)
    dataset = DigitsDetection("val", num_images=6)
    pixels = [torch.from_numpy(dataset.scene(i).image).permute(2, 0, 1) for i in range(6)]
    confident = 0
    for start in (0, 3):  # batches of 3 images of different sizes, so padded
        chunk = pixels[start : start + 3]
        found, _ = detector.detect(chunk)
        images, mask = detector.preprocess(chunk)
        sizes = torch.tensor([list(p.shape[-2:]) for p in chunk])
        actual = exported(images=images, mask=mask, orig_sizes=sizes)
        expected = {
            "scores": torch.stack([d.scores for d in found]),
            "labels": torch.stack([d.labels for d in found]),
            "boxes": torch.stack([d.boxes for d in found]),
        }
        assert compare(expected, actual, TOLERANCE, sizes)["labels"] == 0
        confident += int((expected["scores"] >= 0.3).sum())
    if trained:
        assert confident > 0, "the trained demo model should find digits"


def test_portable_attention_equals_reference():
    """The gather decomposition ONNX runs: the same bilinear sampling as grid_sample, points
    off the map included."""
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5], [1, 2]])
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(2, int(areas.sum()), 3, 8, generator=generator)
    locations = torch.rand(2, 11, 3, 4, 4, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(2, 11, 3, 4, 4, generator=generator)
    expected = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    actual = ms_deform_attn_portable(value, shapes, starts, locations, weights)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_resize_mask_picks_the_pixels_interpolate_picks():
    """resize_mask is index arithmetic (ONNX's Resize rounds differently at some sizes) that
    must give exactly what the original's F.interpolate gives."""
    generator = torch.Generator().manual_seed(0)
    for height in range(1, 300, 7):
        mask = torch.rand(1, height, 5, generator=generator) > 0.5
        for out in {1, height, 2 * height, *(-(-height // s) for s in (2, 8, 16, 32, 64, 3))}:
            expected = F.interpolate(mask[None].float(), size=(out, 5)).bool()[0]
            assert torch.equal(resize_mask(mask, (out, 5)), expected), (height, out)


def test_a_difference_above_tolerance_is_an_error_naming_the_output():
    expected = {"pred_logits": torch.zeros(2, 5, 3), "pred_boxes": torch.zeros(2, 5, 4)}
    actual = {"pred_logits": torch.zeros(2, 5, 3), "pred_boxes": torch.zeros(2, 5, 4)}
    actual["pred_boxes"][1, 2, 0] = 3e-3
    with pytest.raises(ExportError, match=r"pred_boxes differs from PyTorch by 3\.00e-03"):
        compare(expected, actual, TOLERANCE)
    assert compare(expected, expected, TOLERANCE) == {"pred_logits": 0.0, "pred_boxes": 0.0}


def test_detections_may_swap_order_only_where_scores_tie():
    sizes = torch.tensor([[100, 200]])
    expected = {
        "scores": torch.tensor([[0.9, 0.5, 0.5]]),
        "labels": torch.tensor([[1, 2, 0]]),
        "boxes": torch.tensor([[[0.0, 0, 10, 10], [5, 5, 9, 9], [1, 1, 2, 2]]]),
    }
    swapped = {k: v[:, [0, 2, 1]] for k, v in expected.items()}
    assert compare(expected, swapped, TOLERANCE, sizes) == {"scores": 0, "boxes": 0, "labels": 0}
    relabelled = {**expected, "labels": torch.tensor([[1, 1, 0]])}
    with pytest.raises(ExportError, match="1 detections have no counterpart"):
        compare(expected, relabelled, TOLERANCE, sizes)


def test_bad_requests_fail_before_any_work(tmp_path):
    model = tiny_model("detr")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        detrkit.export(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ValueError, match=r"opset 13 is too old.*18 or later"):
        detrkit.export(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="does not exist"):
        detrkit.export(model, tmp_path / "missing" / "m.onnx", "torch")
    with pytest.raises(ExportError, match="is a directory"):
        detrkit.export(model, tmp_path, "torch")
    with pytest.raises(TypeError, match="detrkit model"):
        detrkit.export(torch.nn.Linear(2, 2), tmp_path / "m.pt2", "torch")
    with pytest.raises(ValueError, match=r"opset 23 is too new.*18 to 22"):
        detrkit.export(model, tmp_path / "m.onnx", opset=23)
    with pytest.raises(ExportError, match=r"size 32x40 is too small.*at least 33 pixels"):
        detrkit.export(model, tmp_path / "m.pt2", "torch", size=(32, 40))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.pt2").write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match=r"m\.pt2 already exists; pass overwrite=True"):
        detrkit.export(model, tmp_path / "m.pt2", "torch")
    assert (tmp_path / "m.pt2").read_bytes() == b"an earlier export"


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'detrkit\[export\]'"):
        detrkit.export(tiny_model("detr"), tmp_path / "m.onnx")


def test_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    """The file is written to a temporary name and checked there; a mismatch removes it and
    keeps whatever was at the path before."""
    import detrkit.deploy as deploy

    def fake_trace(graph, format, size, opset, metadata, attention_op):
        return lambda target: target.write_bytes(b"half an export")

    def failing_check(path, graph, checks, tolerance):
        raise ExportError("pred_logits differs from PyTorch by 1.00e-02 (max abs)")

    monkeypatch.setattr(deploy, "_trace", fake_trace)
    monkeypatch.setattr(deploy, "verify_file", failing_check)
    (tmp_path / "m.pt2").write_bytes(b"the previous export")
    with pytest.raises(ExportError, match="pred_logits differs"):
        detrkit.export(tiny_model("detr"), tmp_path / "m.pt2", "torch", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    assert (tmp_path / "m.pt2").read_bytes() == b"the previous export"


@pytest.mark.parametrize(
    ("name", "overrides", "side", "square"),
    [
        ("detr", {}, 33, 33),  # C5, stride 32
        ("deformable", {}, 65, 65),  # the extra stride-64 level
        ("deformable_two_stage", {}, 33, 33),  # C4 and C5; 5 queries from 13 positions at 33
        # 300 queries need 300 positions of C4 and C5: 15x15 + 8x8 at 240, 16x16 + 8x8 at 241
        ("deformable_two_stage", {"num_queries": 300}, 33, 241),
    ],
)
def test_the_smallest_export_size_is_stated_and_enforced(name, overrides, side, square):
    """Each feature map at least 2x2 (a map of 1 pixel fixes the export to it), and two-stage
    as many encoder positions as queries: the message gives the smallest sizes."""
    preset, options = EXPORT_MODELS[name]
    model = detrkit.build_model(preset, **{**EXPORT_TINY, **options, **overrides})
    check_export_size(model, (square, square))
    check_export_size(model, (square, max(square, 1000)))
    with pytest.raises(ExportError, match=f"at least {side} pixels.*smallest square size is "):
        check_export_size(model, (side - 1, 1000))
    if square > side:
        with pytest.raises(ExportError, match=f"at least 300 encoder positions.*{square}x{square}"):
            check_export_size(model, (square - 1, square - 1))


@needs_onnx
@pytest.mark.full  # 12 s; the size check itself is test_the_smallest_export_size_is_stated_and_enforced
def test_an_export_below_the_smallest_size_is_caught(tmp_path, monkeypatch):
    """What the size check prevents: DETR traced at 32x32 (a 1x1 map) runs at that size only.
    Tracing bounds the input's size, which the export reports; and verification at another size
    fails where verification at the export's own size passes."""
    import detrkit.deploy as deploy
    import detrkit.deploy.to_onnx as to_onnx

    caught = []

    def report_dynamic(*args):
        try:
            to_onnx_check(*args)
        except ExportError as error:
            caught.append(str(error))

    to_onnx_check = to_onnx.check_dynamic
    monkeypatch.setattr(deploy, "check_export_size", lambda model, size: None)
    monkeypatch.setattr(to_onnx, "check_dynamic", report_dynamic)
    model = tiny_model("detr")
    path = tmp_path / "m.onnx"
    detrkit.export(model, path, size=(32, 32), verify=False)
    assert caught and "bounded axis 2 (height) of images to at most 32" in caught[0]

    graph = deploy.ExportedDetector(model.requires_grad_(False)).eval()
    own_size, larger = verification_checks(graph.input_names, (32, 32))
    assert verify_file(path, graph, [own_size])["pred_logits"] <= TOLERANCE
    with pytest.raises(ExportError, match=r"ONNX Runtime could not run the export on a batch of 3"):
        verify_file(path, graph, [own_size, larger])


def _ranked(values: list[list[float]]) -> dict[str, torch.Tensor]:
    """Raw outputs of one image whose queries are told apart by their first logit."""
    logits = torch.tensor(values)[None]  # [1, Q, 2]
    return {"pred_logits": logits, "pred_boxes": logits.sigmoid().repeat(1, 1, 2)}


def test_two_stage_queries_may_change_places_only_where_their_proposals_tie():
    """Two-stage queries are the top-k proposals: where proposal scores tie within the
    tolerance, the runtime may order them (or pick among them at the edge) unlike PyTorch."""
    expected = _ranked([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    # proposal scores of queries 0-3, then the best one left out
    scores = torch.tensor([[5.0, 4.00002, 4.0, 2.0, 1.99997]])
    swapped = {k: v[:, [0, 2, 1, 3]] for k, v in expected.items()}
    assert compare(expected, swapped, TOLERANCE, query_scores=scores) == {
        "pred_logits": 0.0,
        "pred_boxes": 0.0,
    }
    # A place change without a tie: the export ranks proposals otherwise than PyTorch.
    with pytest.raises(ExportError, match="2 queries of the export match none of PyTorch's"):
        compare(expected, {k: v[:, [1, 0, 2, 3]] for k, v in expected.items()}, query_scores=scores)
    # The last query ties with the best proposal left out: the runtime may have taken that one.
    other_at_edge = _ranked([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [7.0, 0.0]])
    compare(expected, other_at_edge, TOLERANCE, query_scores=scores)
    untied = torch.tensor([[5.0, 4.00002, 4.0, 2.0, 1.0]])
    with pytest.raises(ExportError, match="1 queries of the export match none"):
        compare(expected, other_at_edge, TOLERANCE, query_scores=untied)
    # Tied queries are still compared in full: a logit off by 1e-3 is a difference.
    off = {k: v.clone() for k, v in swapped.items()}
    off["pred_logits"][0, 1, 1] += 1e-3
    with pytest.raises(ExportError, match="1 queries of the export match none"):
        compare(expected, off, TOLERANCE, query_scores=scores)


@pytest.mark.full  # a whole two-stage export and verification: 20 s
@needs_onnx
def test_two_stage_onnx_export_is_kept_where_proposal_scores_tie(tmp_path):
    """The two-stage export refused at the default size, in small: 300 queries from 650
    positions, where ONNX Runtime and PyTorch order near-tied proposals differently (on the
    development machine, the export's own check, one image at its size, had two queries
    swapped: 0.35 apart position by position). The export is kept, its queries are PyTorch's
    as a set, and a real difference still fails. (30 s: tracing with 300 queries.)"""
    model = tiny_model("deformable_two_stage", num_queries=300)
    path = tmp_path / "two_stage.onnx"
    result = detrkit.export(model, path, size=(320, 416))
    assert result.verified_shapes[0] == (1, 320, 416)
    assert max(result.differences.values()) <= TOLERANCE

    graph = ExportedDetector(model).eval()
    inputs = verification_checks(graph.input_names, (320, 416))[0]
    expected, query_scores = pytorch_outputs(graph, inputs)
    actual = ExportedModel(path)(**inputs)
    differences = compare(expected, actual, TOLERANCE, query_scores=query_scores)
    assert max(differences.values()) <= TOLERANCE
    actual["pred_boxes"][0, 0, 1] += 1e-3  # the best query, far from any tie
    with pytest.raises(ExportError, match="1 queries of the export match none"):
        compare(expected, actual, TOLERANCE, query_scores=query_scores)


def test_nan_in_the_export_is_a_difference():
    expected = {"pred_logits": torch.zeros(1, 5, 3), "pred_boxes": torch.zeros(1, 5, 4)}
    actual = {k: v.clone() for k, v in expected.items()}
    actual["pred_logits"][0, 3, 1] = float("nan")
    with pytest.raises(ExportError, match="pred_logits differs from PyTorch by nan"):
        compare(expected, actual, TOLERANCE)
    with pytest.raises(ExportError, match="1 queries of the export match none"):
        compare(expected, actual, TOLERANCE, query_scores=torch.arange(6.0).flip(0)[None])
    detections = {
        "scores": torch.tensor([[0.9, 0.5]]),
        "labels": torch.tensor([[1, 2]]),
        "boxes": torch.tensor([[[0.0, 0, 10, 10], [5, 5, 9, 9]]]),
    }
    broken = {**detections, "boxes": detections["boxes"].clone()}
    broken["boxes"][0, 1, 2] = float("nan")
    with pytest.raises(ExportError, match="1 detections have no counterpart"):
        compare(detections, broken, TOLERANCE, torch.tensor([[100, 200]]))


# --- DETR's panoptic models: pred_masks beside the detector's outputs ---------------------------

PANOPTIC_SIZE = (64, 96)  # the smallest DETR takes is 33: masks of 16x24 at the export's size
PANOPTIC_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks")


@pytest.fixture(scope="module")
def panoptic_checkpoint(tmp_path_factory) -> Path:
    """A tiny panoptic model with a thing class and two stuff classes, whose every query's best
    class is the stuff class "dog": the tiny model's masks are all but equal for all queries
    (differences near 1e-7), so a map of several things would hang on ties between runtimes,
    while the queries of one stuff class make one segment whichever of them a pixel goes to."""
    folder = tmp_path_factory.mktemp("panoptic")
    model = tiny_panoptic_model()
    model.config.class_names = ["cat", "dog", "sky"]
    model.config.category_ids = [1, 5, 17]
    model.config.is_thing = [True, False, False]
    with torch.no_grad():
        model.detr.class_embed.bias.copy_(torch.tensor([0.0, 3.0, 0.0, 0.0]))
    return detrkit.save(model, folder / "checkpoint")


@pytest.fixture(scope="module")
def panoptic_export(panoptic_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """`detrkit export` of the panoptic checkpoint (one ONNX trace, 25 s), for images resized
    to short side 64, long side at most 107; the file and what the command printed."""
    out = tmp_path_factory.mktemp("panoptic-export") / "panoptic.onnx"
    size = [str(side) for side in PANOPTIC_SIZE]
    resize = ["--short-side", "64", "--max-size", "107"]
    arguments = ["export", "--weights", str(panoptic_checkpoint), "--out", str(out)]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main([*arguments, "--size", *size, *resize]) == 0
    return out, output.getvalue()


@needs_onnx
def test_cli_exports_a_panoptic_model_with_its_masks(panoptic_checkpoint, panoptic_export):
    """`detrkit export` of DETR's panoptic model: pred_masks [B, Q, H/4, W/4] (rounded up) beside
    pred_logits and pred_boxes, verified, named in the metadata, and what PyTorch computes at
    other batch and image sizes, padded or not."""
    import onnx

    out, printed = panoptic_export
    assert "verified with ONNX Runtime on a batch of 1 at 64x96 and a batch of 3 at" in printed
    assert "pred_masks" in printed

    graph = onnx.load(out)
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in graph.graph.output
    }
    assert list(dims) == list(PANOPTIC_OUTPUTS)
    # ceil(height / 4) and ceil(width / 4), in the tracer's words but the inputs' axis names
    assert dims["pred_masks"] == ["batch", 5, "(((height - 1)//4)) + 1", "(((width - 1)//4)) + 1"]
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert metadata["model_type"] == "detr_segmentation"
    assert json.loads(metadata["outputs"]) == list(PANOPTIC_OUTPUTS)
    assert metadata["masks"].startswith("pred_masks [B, K, ceil(H/4), ceil(W/4)]: mask logits")
    assert json.loads(metadata["is_thing"]) == [True, False, False]

    exported = ExportedModel(out)
    assert exported.input_names == ["images", "mask"]
    assert exported.output_names == list(PANOPTIC_OUTPUTS)
    assert {node.domain for node in graph.graph.node} == {""} and not graph.functions
    model = detrkit.load(panoptic_checkpoint).eval()
    assert_matches_pytorch(model, exported, outputs=PANOPTIC_OUTPUTS)
    images, mask = batch((131, 147), 3, padded=True)
    assert exported(images=images, mask=mask)["pred_masks"].shape == (3, 5, 33, 37)


@pytest.mark.full
@pytest.mark.parametrize(
    ("format", "options"),
    [
        pytest.param("torch", {}, id="torch"),
        pytest.param("onnx", {"with_mask": False}, marks=needs_onnx, id="onnx-no-mask"),
        pytest.param("onnx", {"with_postprocess": True}, marks=needs_onnx, id="onnx-postprocess"),
        pytest.param("torch", {"with_postprocess": True}, id="torch-postprocess"),
        pytest.param("onnx", {"opset": 22}, marks=needs_onnx, id="onnx-opset-22"),
    ],
)
def test_every_export_option_takes_a_panoptic_model(tmp_path, format, options):
    """Every format and option of `detrkit export` on the panoptic model: the export verifies,
    and its pred_masks are PyTorch's, per query or, post-processed, per detection (DETR's
    detections are its queries, in order)."""
    model = tiny_panoptic_model()
    path = tmp_path / ("m.onnx" if format == "onnx" else "m.pt2")
    result = detrkit.export(model, path, format, size=PANOPTIC_SIZE, **options)
    assert result.differences["pred_masks"] <= TOLERANCE
    exported = ExportedModel(path)
    with_mask = options.get("with_mask", True)
    if not options.get("with_postprocess"):
        assert exported.output_names == list(PANOPTIC_OUTPUTS)
        assert_matches_pytorch(model, exported, with_mask, outputs=PANOPTIC_OUTPUTS)
        return
    assert exported.output_names == ["scores", "labels", "boxes", "queries", "pred_masks"]
    images, mask = batch((131, 147), 3, padded=True)
    orig_sizes = torch.tensor([[480, 640], [300, 500], [131, 147]])
    actual = exported(images=images, mask=mask, orig_sizes=orig_sizes)
    with torch.no_grad():
        outputs = model(images, mask)
        found = detrkit.models.PostProcess.for_config(model.config).batched(outputs, orig_sizes)
    assert torch.equal(found["queries"], torch.arange(5).expand(3, 5))
    expected = {name: found[name] for name in ("scores", "labels", "boxes")}
    expected["pred_masks"] = outputs["pred_masks"]
    differences = compare(expected, actual, TOLERANCE, orig_sizes)
    assert differences["labels"] == 0 and differences["pred_masks"] <= TOLERANCE


def test_post_processed_masks_are_compared_with_the_matching_detection():
    """Post-processed, each detection's masks must be those of the PyTorch detection its label,
    score and box match: detections may swap places where scores tie, their masks with them."""
    sizes = torch.tensor([[100, 200]])
    masks = torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = {
        "scores": torch.tensor([[0.9, 0.5, 0.5]]),
        "labels": torch.tensor([[1, 2, 2]]),
        "boxes": torch.tensor([[[0.0, 0, 10, 10], [5, 5, 9, 9], [1, 1, 2, 2]]]),
        "pred_masks": masks,
    }
    swapped = {k: v[:, [0, 2, 1]] for k, v in expected.items()}
    differences = compare(expected, swapped, TOLERANCE, sizes)
    assert differences == {"scores": 0, "boxes": 0, "labels": 0, "pred_masks": 0}
    # The boxes swapped but not the masks: two detections with another detection's masks.
    wrong = {**swapped, "pred_masks": masks}
    with pytest.raises(ExportError, match=r"2 detections have no counterpart.*masks within 1e-04"):
        compare(expected, wrong, TOLERANCE, sizes)
    off = {k: v.clone() for k, v in expected.items()}
    off["pred_masks"][0, 0, 2, 3] += 5e-5
    assert compare(expected, off, TOLERANCE, sizes)["pred_masks"] == pytest.approx(5e-5, rel=1e-2)
    off["pred_masks"][0, 0, 2, 3] = float("nan")
    with pytest.raises(ExportError, match="1 detections have no counterpart"):
        compare(expected, off, TOLERANCE, sizes)


def test_the_smallest_panoptic_export_size_is_its_detectors():
    """The mask head reads C2-C4 of the detector's backbone (under ``detr``): the coarsest map is
    still C5, so the smallest size is DETR's."""
    model = tiny_panoptic_model()
    check_export_size(model, (33, 33))
    with pytest.raises(ExportError, match=r"size 32x64 is too small.*at least 33 pixels"):
        check_export_size(model, (32, 64))


def set_metadata(source: Path, target: Path, values: dict[str, str | None]) -> None:
    """A copy of an ONNX file with metadata values replaced (None: the key removed)."""
    import onnx

    graph = onnx.load(source)
    kept = [entry for entry in graph.metadata_props if values.get(entry.key, "") is not None]
    for entry in kept:
        entry.value = values.get(entry.key, entry.value)
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, target)


def panoptic_images() -> list[torch.Tensor]:
    """RGB uint8 images of three sizes (one capped by the long side), padded into one batch."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(70, 90), (160, 80), (50, 50)]
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes
    ]


def assert_same_panoptic(actual, expected) -> None:
    """The same segments (ids, labels, names, category ids, kinds; scores to 1e-4, areas to
    0.1%) and segment maps equal but for pixels where two masks' logits nearly tie."""
    assert len(actual) == len(expected)
    for found, wanted in zip(actual, expected):
        assert found.segment_ids.shape == wanted.segment_ids.shape
        assert (found.segment_ids != wanted.segment_ids).float().mean() <= 1e-3
        described = [
            [(s.id, s.label, s.name, s.category_id, s.isthing) for s in result.segments]
            for result in (found, wanted)
        ]
        assert described[0] == described[1]
        for a, b in zip(found.segments, wanted.segments):
            assert abs(a.score - b.score) <= 1e-4
            assert abs(a.area - b.area) <= 1e-3 * found.segment_ids.numel()


@needs_onnx
def test_exported_panoptic_segmentation_equals_the_detectors(
    panoptic_checkpoint, panoptic_export, tmp_path
):
    """ExportedModel.panoptic against Detector.panoptic on the same model and resize: images of
    three sizes in one padded batch, then one image alone at the default threshold; a file
    written before is_thing was recorded takes it from the model's config."""
    out, _ = panoptic_export
    exported = ExportedModel(out)
    model = detrkit.load(panoptic_checkpoint).eval()
    detector = detrkit.Detector(model, 0.0, 64, 107, device="cpu")
    pictures = panoptic_images()
    found = exported.panoptic(pictures, threshold=0.5, min_area=0)
    assert_same_panoptic(found, detector.panoptic(pictures, threshold=0.5, min_area=0))
    for result, picture in zip(found, pictures):
        # Five queries kept, merged into one stuff segment over the whole image.
        assert result.segment_ids.shape == picture.shape[-2:]
        segments = [(s.label, s.name, s.category_id, s.isthing, s.area) for s in result.segments]
        assert segments == [(1, "dog", 5, False, picture.shape[-2] * picture.shape[-1])]
    assert_same_panoptic([exported.panoptic(pictures[1])], [detector.panoptic(pictures[1])])
    set_metadata(out, tmp_path / "old.onnx", {"is_thing": None})
    old = ExportedModel(tmp_path / "old.onnx").panoptic(pictures, threshold=0.5, min_area=0)
    assert_same_panoptic(old, found)


@needs_onnx
def test_exported_panoptic_refuses_what_it_cannot_segment(
    panoptic_checkpoint, panoptic_export, tmp_path
):
    """Bad options are refused by ExportedModel and Detector alike; a bad is_thing names the
    key; a post-processed graph (each detection's mask, no query's classes) and a detection
    model (no masks) say why they cannot segment."""
    out, _ = panoptic_export
    picture = panoptic_images()[0]
    for value in ("[true, false]", "[1, 0, 1]", "nope"):
        set_metadata(out, tmp_path / "bad.onnx", {"is_thing": value})
        with pytest.raises(ExportError, match="is_thing must be"):
            ExportedModel(tmp_path / "bad.onnx").panoptic(picture)
    detector = detrkit.Detector(detrkit.load(panoptic_checkpoint), 0.0, 64, 107, device="cpu")
    for options in ({"threshold": 1.5}, {"threshold": "0.5"}, {"min_area": -1}, {"min_area": 0.5}):
        name = next(iter(options))
        for segment in (ExportedModel(out).panoptic, detector.panoptic):
            with pytest.raises(ValueError, match=f"{name} must be"):
                segment(picture, **options)
    # ExportedModel reads what the file returns from the metadata's outputs.
    outputs = {
        '["scores", "labels", "boxes", "queries", "pred_masks"]': "without --with-postprocess",
        '["pred_logits", "pred_boxes"]': "a detection model, without masks",
    }
    for value, message in outputs.items():
        set_metadata(out, tmp_path / "other.onnx", {"outputs": value})
        with pytest.raises(ExportError, match=message):
            ExportedModel(tmp_path / "other.onnx").panoptic(picture)


@needs_onnx
def test_linear_layers_on_tokens_are_written_as_gemm(tmp_path):
    """MatMul then Add of a linear layer on [B, S, K] tokens becomes Reshape, Gemm, Reshape: the
    same values at other batch and token counts; a layer whose Add is a graph output keeps it."""
    import onnx_ir as ir
    import onnxruntime

    from detrkit.deploy.to_onnx import linear_layers_as_gemm

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, tokens):
            return self.second(torch.relu(self.first(tokens)))

    module = TwoLayers().eval()
    tokens = torch.randn(2, 5, 8)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module, (tokens,), dynamo=True, dynamic_shapes=({0: batch, 1: length},)
        )
    model = program.model
    assert linear_layers_as_gemm(model) == 1  # the second layer's Add is the output
    ops = [node.op_type for node in model.graph]
    assert ops.count("Gemm") == 1 and ops.count("MatMul") == 1
    path = tmp_path / "layers.onnx"
    ir.save(model, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 8), (4, 7, 8)]:
        x = torch.randn(shape)
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(actual), module(x), atol=1e-6), shape

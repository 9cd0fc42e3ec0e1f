"""ExportedModel.detect: an exported file alone (its metadata, no checkpoint) gives the detections
detrkit.Detector gives, on image files and arrays, for every kind of export."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from detrkit.cli.main import main
from detrkit.data import ImageReadError
from detrkit.deploy import ExportedModel, ExportError
from helpers import needs_onnx, tiny_model, tiny_panoptic_model

# A `detrkit train` run at this image scale resizes to short side 64, long side at most 107.
IMAGE_SCALE = 0.08
RESIZE = (64, 107)
EXPORT_SIZE = (64, 64)
CLASS_NAMES = ["cat", "dog", "bird"]
CATEGORY_IDS = [1, 5, 17]
# Differently sized, so that a batch is padded: one landscape, one portrait (long side capped by
# max size 107: 160 x 80 -> 107 x 53), one square.
IMAGE_SIZES = [(70, 90), (160, 80), (50, 50)]


def images(seed: int = 0) -> list[np.ndarray]:
    """Random RGB uint8 arrays [H, W, 3] of IMAGE_SIZES."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def write_images(folder: Path, arrays: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(len(arrays))]
    for array, path in zip(arrays, paths):
        Image.fromarray(array).save(path)
    return paths


def assert_same_detections(actual, expected) -> None:
    """The same detections: labels, names, queries, category ids and masks equal, scores within
    1e-4, boxes within 1e-3 (relative, and 1e-3 px). Both best first; detections are paired by
    (query, label), so that near ties may come in either order."""
    assert len(actual) == len(expected)
    for found, wanted in zip(actual, expected):
        assert found.image_size == wanted.image_size
        assert len(found) == len(wanted) > 0
        for item in (found, wanted):
            assert torch.all(item.scores[:-1] >= item.scores[1:] - 1e-6)
        order = [
            (item.queries * 1000 + item.labels).argsort() for item in (found, wanted)
        ]  # the same (query, label) pairs, in one order
        pick = lambda item, o, name: getattr(item, name)[o]  # noqa: E731
        for name in ("labels", "queries", "category_ids"):
            assert torch.equal(pick(found, order[0], name), pick(wanted, order[1], name)), name
        assert [found.names[i] for i in order[0]] == [wanted.names[i] for i in order[1]]
        torch.testing.assert_close(
            pick(found, order[0], "scores"), pick(wanted, order[1], "scores"), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            pick(found, order[0], "boxes"), pick(wanted, order[1], "boxes"), rtol=1e-3, atol=1e-3
        )
        assert (found.masks is None) == (wanted.masks is None)
        if wanted.masks is not None:
            # Boolean masks from logits equal to 1e-4: a pixel may flip only where the
            # sigmoid is within that of the threshold.
            differing = (found.masks[order[0]] != wanted.masks[order[1]]).float().mean()
            assert differing <= 1e-3


def detector_detections(detector: detrkit.Detector, inputs: list, padded: bool) -> list:
    """What Detector finds: the images in one padded batch, or one at a time (what a file
    without a mask input runs)."""
    return detector(inputs) if padded else [detector(image) for image in inputs]


def assert_detects_as_detector(
    exported: ExportedModel, detector: detrkit.Detector, folder: Path
) -> None:
    """Arrays of different sizes, then the same images as PNG files."""
    padded = "mask" in exported.input_names
    arrays = images()
    assert_same_detections(
        exported.detect(arrays, threshold=0.0), detector_detections(detector, arrays, padded)
    )
    paths = write_images(folder, images(seed=1))
    assert_same_detections(
        exported.detect(paths, threshold=0.0), detector_detections(detector, paths, padded)
    )


# --- A training run's checkpoint through `detrkit export` ----------------------------------------


def write_training_run(folder: Path) -> Path:
    """A checkpoint as a `detrkit train` run leaves it, with the run's config.json beside it."""
    model = tiny_model("detr")
    model.config.class_names = list(CLASS_NAMES)
    model.config.category_ids = list(CATEGORY_IDS)
    folder.mkdir()
    checkpoint = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    torch.save(checkpoint, folder / "checkpoint.pth")
    config = {"model": "detr_digits", "data": "digits", "image_scale": IMAGE_SCALE}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "checkpoint.pth"


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> tuple[Path, Path, str]:
    """(checkpoint, its ONNX export by `detrkit export`, what the command wrote to stderr)."""
    folder = tmp_path_factory.mktemp("cli")
    weights = write_training_run(folder / "run")
    out = folder / "detr.onnx"
    stderr = io.StringIO()
    argv = [
        "export",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--size",
        *map(str, EXPORT_SIZE),
    ]
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return weights, out, stderr.getvalue()


@needs_onnx
def test_cli_export_records_what_a_deployer_needs(cli_export):
    """The training run's image scale (read from the weights, as Detector.from_checkpoint reads
    it), the class names, the dataset's category ids, the normalisation and the padding."""
    _, path, stderr = cli_export
    assert f"short side 64, long side at most 107 (image_scale {IMAGE_SCALE}" in stderr
    exported = ExportedModel(path)
    metadata = exported.metadata
    resize = json.loads(metadata["resize"])
    assert (resize["short_side"], resize["max_size"]) == RESIZE
    assert "round(max_size * short / long)" in resize["rule"]
    assert json.loads(metadata["category_ids"]) == CATEGORY_IDS
    assert json.loads(metadata["class_names"]) == CLASS_NAMES
    assert json.loads(metadata["image_mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["image_std"]) == [0.229, 0.224, 0.225]
    assert "bottom and right" in metadata["padding"] and "True on padding" in metadata["padding"]
    assert (exported.size, exported.max_size) == RESIZE
    assert exported.category_ids == CATEGORY_IDS


@needs_onnx
def test_detections_equal_the_detectors_on_files_and_arrays(cli_export, tmp_path):
    """The file alone resizes as Detector.from_checkpoint resizes for the same weights (the
    training run's scale), and finds the same detections, named and with category ids."""
    weights, path, _ = cli_export
    detector = detrkit.Detector.from_checkpoint(weights, device="cpu", threshold=0.0)
    assert (detector.size, detector.max_size) == RESIZE
    exported = ExportedModel(path)
    assert_detects_as_detector(exported, detector, tmp_path)

    # One image gives its Detections; a PIL image and a tensor as Detector takes them.
    array = images()[1]
    found = exported.detect(array, threshold=0.0)
    assert isinstance(found, detrkit.inference.Detections)
    assert_same_detections([found], [detector(array)])
    assert set(found.names) <= set(CLASS_NAMES)
    assert found.category_ids.tolist() == [CATEGORY_IDS[i] for i in found.labels.tolist()]
    pil = Image.fromarray(array)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    assert_same_detections(exported.detect([pil, tensor], threshold=0.0), detector([pil, tensor]))
    # The threshold keeps the same detections as Detector's.
    detector.threshold = 0.3
    assert_same_detections([exported.detect(array, threshold=0.3)], [detector(array)])

    # The named-tensor call is unchanged.
    batch, mask = detector.preprocess([tensor])
    outputs = exported(images=batch, mask=mask)
    assert set(outputs) == {"pred_logits", "pred_boxes"}


def strip_metadata(source: Path, target: Path, keys: set[str]) -> None:
    import onnx

    graph = onnx.load(source)
    kept = [entry for entry in graph.metadata_props if entry.key not in keys]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, target)


@needs_onnx
def test_a_file_without_the_new_keys_resizes_to_800_1333(cli_export, tmp_path):
    """Files written before the metadata had resize and category_ids: 800 / 1333, and the
    labels as category ids, without a word."""
    weights, path, _ = cli_export
    old = tmp_path / "old.onnx"
    strip_metadata(path, old, {"resize", "category_ids", "padding"})
    exported = ExportedModel(old)
    assert (exported.size, exported.max_size) == (800, 1333)
    assert exported.category_ids is None
    model = detrkit.load(weights)
    detector = detrkit.Detector(model, threshold=0.0, device="cpu")  # 800 / 1333
    model.config.category_ids = None  # what the old file knows
    image = images()[2][:24, :30]  # resized to 800 x 1000
    found = exported.detect(image, threshold=0.0)
    assert found.image_size == (24, 30)
    assert_same_detections([found], [detector(image)])
    assert torch.equal(found.category_ids, found.labels)


@needs_onnx
def test_bad_input_is_a_clear_error(cli_export, tmp_path):
    _, path, _ = cli_export
    exported = ExportedModel(path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        exported.detect(broken)
    with pytest.raises(ImageReadError, match=r"missing\.png: no such image file"):
        exported.detect([images()[0], tmp_path / "missing.png"])
    with pytest.raises(
        ValueError, match=r"must be \[H, W, C\] with 1, 3 or 4 channels.*\(5, 6, 2\)"
    ):
        exported.detect(np.zeros((5, 6, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"ExportedModel\.detect was given an empty list"):
        exported.detect([])
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        exported.detect(images()[0], threshold=2)
    with pytest.raises(TypeError, match="a path, a PIL image, a numpy array or a tensor"):
        exported.detect(3)

    # Metadata that does not parse names its key and the file.
    bad = tmp_path / "bad.onnx"
    import onnx

    graph = onnx.load(path)
    for entry in graph.metadata_props:
        if entry.key == "resize":
            entry.value = '{"short_side": 0, "max_size": 107}'
    onnx.save(graph, bad)
    with pytest.raises(ExportError, match=r"bad\.onnx: the metadata's resize must be"):
        ExportedModel(bad)
    # A file without detrkit's metadata runs with named tensors, but detect() refuses it.
    bare = tmp_path / "bare.onnx"
    strip_metadata(path, bare, {"class_names", "classification", "category_ids"})
    with pytest.raises(ExportError, match=r"bare\.onnx: no class_names and classification"):
        ExportedModel(bare).detect(images()[0])


def test_export_refuses_a_bad_resize_before_any_work(tmp_path):
    model = tiny_model("detr")
    for resize, message in [
        ((0, 100), "resize's short side must be a positive integer, got 0"),
        ((64, None), "resize's max size must be a positive integer, got None"),
        (64, r"resize must be \(short side, max size\), got 64"),
    ]:
        with pytest.raises(ValueError, match=message):
            detrkit.export(model, tmp_path / "m.onnx", resize=resize)
    assert not list(tmp_path.iterdir())


# --- Every kind of export ----------------------------------------------------------------------

# (model, export options, format): DETR's raw ONNX export with a mask is checked above, and
# `make test` runs Deformable DETR's post-processed .pt2 here (the quickest to export); the rest
# of the matrix is `make test-full`'s.
DEFORMABLE = dict(num_feature_levels=1, dec_layers=1)
CASES = {
    "deformable": ("deformable", {}, "onnx"),
    "detr-no-mask": ("detr", {"with_mask": False}, "onnx"),
    "deformable-no-mask": ("deformable", {"with_mask": False}, "onnx"),
    "detr-postprocess": ("detr", {"with_postprocess": True}, "onnx"),
    "deformable-postprocess": ("deformable", {"with_postprocess": True}, "onnx"),
    "detr-torch": ("detr", {}, "torch"),
    "deformable-postprocess-torch": ("deformable", {"with_postprocess": True}, "torch"),
    "panoptic": ("panoptic", {}, "onnx"),
    "panoptic-postprocess": ("panoptic", {"with_postprocess": True}, "onnx"),
}
FAST = {"deformable-postprocess-torch"}


def case_model(name: str) -> torch.nn.Module:
    if name == "panoptic":
        model = tiny_panoptic_model()
    else:
        model = tiny_model(name, **(DEFORMABLE if name == "deformable" else {}))
    model.config.class_names = list(CLASS_NAMES)
    model.config.category_ids = list(CATEGORY_IDS)
    return model


def _marks(case: str) -> list:
    marks = [needs_onnx] if CASES[case][2] == "onnx" else []
    return marks if case in FAST else [*marks, pytest.mark.full]


@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c), id=c) for c in CASES])
def test_every_kind_of_export_detects_as_the_detector(case, tmp_path):
    """Raw outputs post-processed by PostProcess, or the graph's own post-processing (its
    queries included); a mask input batches the images, none runs them one at a time; a
    panoptic model's masks come with its detections."""
    name, options, format = CASES[case]
    model = case_model(name)
    path = tmp_path / ("model.onnx" if format == "onnx" else "model.pt2")
    detrkit.export(model, path, format, size=EXPORT_SIZE, resize=RESIZE, verify=False, **options)
    detector = detrkit.Detector(model, 0.0, RESIZE[0], RESIZE[1], device="cpu")
    exported = ExportedModel(path)
    if options.get("with_postprocess"):
        assert "queries" in exported.output_names
    assert_detects_as_detector(exported, detector, tmp_path / "images")


@pytest.mark.full
@needs_onnx
def test_an_old_post_processed_file_without_queries(tmp_path):
    """Post-processed files from before the graph returned queries: DETR's detections are its
    queries in order; Deformable DETR's are unknown (-1)."""
    import onnx

    model = case_model("detr")
    path = tmp_path / "model.onnx"
    detrkit.export(model, path, size=EXPORT_SIZE, resize=RESIZE, with_postprocess=True)
    graph = onnx.load(path)
    kept = [o for o in graph.graph.output if o.name != "queries"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    for entry in graph.metadata_props:
        if entry.key == "outputs":
            entry.value = json.dumps(["scores", "labels", "boxes"])
    onnx.save(graph, tmp_path / "old.onnx")
    detector = detrkit.Detector(model, 0.0, RESIZE[0], RESIZE[1], device="cpu")
    assert_detects_as_detector(ExportedModel(tmp_path / "old.onnx"), detector, tmp_path)

"""``detrkit predict``, ``explain`` and ``trace``: from the command line, and for every preset."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import detrkit
from detrkit.cli.main import main
from detrkit.inference import Detector
from detrkit.inference.explain import explain
from detrkit.inference.trace import format_trace, trace_model
from detrkit.models import PRESETS, DeformableDETRConfig, DETRSegmentationConfig


def write_images(directory, sizes, names=None):
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i, (height, width) in enumerate(sizes):
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        path = directory / (names[i] if names else f"image{i}.png")
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return detrkit.save(
        detrkit.build_model("detr_digits"), tmp_path_factory.mktemp("ckpt") / "model"
    )


def test_predict_writes_pictures_and_coco_results(tmp_path, checkpoint, capsys):
    good = write_images(tmp_path / "in", [(60, 80), (72, 64)], ["000000000139.png", "42.jpg"])
    more = write_images(tmp_path / "more", [(50, 50)], ["7.png"])
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["predict", "--weights", str(checkpoint), "--out", str(tmp_path / "out")]
    args += ["--threshold", "0.0", "--short-side", "64", "--batch-size", "2"]
    inputs = [str(tmp_path / "in"), str(tmp_path / "more" / "*.png"), str(tmp_path / "nope.png")]

    assert main([*args, *inputs]) == 1  # some inputs were skipped, the rest processed
    err = capsys.readouterr().err
    assert "corrupt.png: cannot decode the image" in err and "nope.png: no such file" in err
    assert "skipped 2 inputs" in err

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "000000000139.png",
        "42.jpg",
        "7.png",
        "detections.json",
        "images.json",
    ]
    for path in [*good, *more]:
        drawn = out / (path.stem + path.suffix)
        original = torch.from_numpy(np.array(Image.open(path)))
        picture = torch.from_numpy(np.array(Image.open(drawn)))
        assert picture.shape == original.shape  # the input's size
        if path.suffix == ".png":  # lossless: the boxes changed pixels, not all of them
            changed = (picture != original).any(-1).float().mean()
            assert 0 < changed < 0.9

    images = json.loads((out / "images.json").read_text())
    # All file names are numbers: they are the image ids, as in COCO.
    assert [(i["id"], i["height"], i["width"]) for i in images] == [
        (139, 60, 80),
        (42, 72, 64),
        (7, 50, 50),
    ]
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": [],
        "categories": [{"id": i, "name": str(i)} for i in range(10)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        results = ground_truth.loadRes(str(out / "detections.json"))
    assert len(results.getAnnIds()) == 3 * 20  # threshold 0: every query of every image

    # The JSON holds what the Detector finds (the first two images made one padded batch), boxes
    # as x, y, w, h in the input's pixels.
    detector = Detector.from_checkpoint(checkpoint, device="cpu", threshold=0.0, size=64)
    expected = detector(good)[0]
    first = [r for r in json.loads((out / "detections.json").read_text()) if r["image_id"] == 139]
    x1, y1, x2, y2 = expected.boxes[0].tolist()
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2e-3)
    assert first[0]["category_id"] == int(expected.labels[0])


def test_predict_refusals(tmp_path, checkpoint, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nothing")
    args = ["predict", "--weights", str(checkpoint), str(tmp_path / "in")]
    # Nothing readable: every input reported, nothing written but the (empty) results.
    assert main([*args, "--out", str(tmp_path / "out")]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []

    assert main([*args[:-1], str(tmp_path / "empty*"), "--out", str(tmp_path / "o")]) == 2
    assert "no image files to predict" in capsys.readouterr().err

    write_images(tmp_path / "in", [(40, 40)], ["a.png"])
    assert main([*args, "--out", str(tmp_path / "in")]) == 2
    assert "would overwrite an input image" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "o"), "--threshold", "3"])


def test_explain_and_trace_from_the_command_line(tmp_path, checkpoint, capsys):
    (image,) = write_images(tmp_path, [(70, 90)])
    args = ["explain", "--weights", str(checkpoint), str(image), "--out", str(tmp_path / "x")]
    assert main([*args, "--threshold", "0", "--max-objects", "2", "--pixel", "10,20"]) == 0
    written = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert written == [
        "detections.png",
        "encoder_self_attention.png",
        "object1_cross_attention.png",
        "object2_cross_attention.png",
    ]
    assert "object #2" in capsys.readouterr().out

    # Nothing passes: the message says how far the best candidate was.
    none = ["explain", "--weights", str(checkpoint), str(image), "--out", str(tmp_path / "none")]
    assert main([*none, "--threshold", "1"]) == 0
    best = Detector.from_checkpoint(checkpoint, device="cpu", threshold=0.0)(image)
    assert (
        f"nothing in {image} scored at least 1.0 (the highest score was {float(best.scores[0]):.2f}"
        f", {best.names[0]!r}, query {int(best.queries[0])}); only the encoder figures were drawn"
    ) in capsys.readouterr().err
    assert main([*args, "--pixel", "10,200"]) == 2
    assert "pixel (10.0, 200.0) is outside the image" in capsys.readouterr().err

    options = ["enc_layers=1", "dec_layers=1", "hidden_dim=64", "backbone=resnet18"]
    command = ["trace", "--model", "deformable_detr", "--size", "64", "96"]
    assert main([*command, *(f"--model-option={option}" for option in options)]) == 0
    table = capsys.readouterr().out
    assert "deformable_detr on one random 64x96 image" in table
    # The levels of a 64 x 96 image: strides 8, 16, 32 and the extra stride-2 conv.
    assert "(H, W) of every level: [[8, 12], [4, 6], [2, 3], [1, 2]]" in table
    assert "[1, 128, 8, 4, 4, 2]" in table  # encoder sampling locations [B, S, M, L, P, 2]
    assert "encoder layer x1" in table and "encoder layer 1" not in table

    # A checkpoint on an image, resized as predict resizes it (short side 800, long at most 1333).
    command = ["trace", "--weights", str(checkpoint), "--image", str(image)]
    assert main(command) == 0
    table = capsys.readouterr().out
    assert f"on {image.name} resized to 800x1028" in table
    assert "[1, 3, 800, 1028]" in table
    layers = detrkit.load(checkpoint).config.dec_layers
    assert f"decoder layer x{layers}" in table


def small_options(name: str) -> dict:
    """Every preset, shrunk to run in a fraction of a second (DC5 needs a bottleneck ResNet, the
    mask head's group norms a hidden_dim of 128)."""
    backbone = "resnet50" if PRESETS[name].dilation else "resnet18"
    masks = isinstance(PRESETS[name], DETRSegmentationConfig)
    return dict(
        backbone=backbone,
        hidden_dim=128 if masks else 32,
        nheads=8 if masks else 2,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=32,
        num_queries=8,
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_explain_and_trace_run_for_every_preset(name, tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(name, **small_options(name)).eval()
    config = model.config
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    objects, written, _ = explain(detector, image, tmp_path, [(40.0, 30.0)], max_objects=1)
    names = {path.name for path in written}
    assert len(objects) == 1 and "detections.png" in names
    if not isinstance(config, DeformableDETRConfig):
        assert names >= {"object1_cross_attention.png", "encoder_self_attention.png"}
    else:
        assert names >= {"object1_sampling_points.png", "encoder_pixel1_sampling_points.png"}
        assert ("object1_box_refinement.png" in names) == config.with_box_refine

    table = format_trace(trace_model(model, size=(64, 80)))
    rows = table.splitlines()
    assert "encoder layer x1" in table and "decoder layer x2" in table
    assert any("boxes" in row and "[1, 8, 4]" in row for row in rows)
    if config.model_type == "deformable_detr":
        assert "softmax of Linear(query) over L levels x P points" in table
        assert ("two-stage proposals" in table) == config.two_stage
        assert ("refined reference" in table) == config.with_box_refine
    else:
        stride = 16 if config.dilation else 32
        assert f"stride {stride}" in table and "K = memory + pos" in table


def test_a_training_runs_checkpoint_sees_images_at_the_runs_scale(tmp_path, capsys):
    torch.manual_seed(0)
    model = detrkit.build_model("detr_digits")
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    torch.save(checkpoint, run / "checkpoint.pth")
    config = {"model": "detr_digits", "data": "digits", "image_scale": 0.1}
    (run / "config.json").write_text(json.dumps(config))
    (image,) = write_images(tmp_path / "in", [(100, 150)])
    args = ["predict", "--weights", str(run / "checkpoint.pth"), str(image), "--out"]

    assert main([*args, str(tmp_path / "a"), "--threshold", "0"]) == 0
    assert "short side 80, long side at most 133 (image_scale 0.1" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "b"), "--threshold", "0", "--short-side", "64"]) == 0
    assert "image_scale" not in capsys.readouterr().err
    scaled = json.loads((tmp_path / "a" / "detections.json").read_text())
    given = json.loads((tmp_path / "b" / "detections.json").read_text())
    assert scaled != given  # the model saw 80 x 120, then 64 x 96
    # The Python API does the same, unless told a size.
    detector = detrkit.Detector.from_checkpoint(run / "checkpoint.pth", device="cpu")
    assert (detector.size, detector.max_size) == (80, 133)
    detector = detrkit.Detector.from_checkpoint(run / "checkpoint.pth", device="cpu", size=64)
    assert (detector.size, detector.max_size) == (64, 1333)


def test_predict_skips_images_too_small_for_two_stage_proposals(tmp_path, capsys):
    torch.manual_seed(0)
    model = detrkit.build_model(
        "deformable_detr_two_stage", num_queries=20, enc_layers=1, dec_layers=1, num_classes=3
    )
    weights = detrkit.save(model, tmp_path / "model")
    sizes, names = [(16, 16), (20, 20), (96, 96)], ["small.png", "small2.png", "large.png"]
    inputs = [str(path) for path in write_images(tmp_path / "in", sizes, names)]
    args = ["predict", "--weights", str(weights), "--out", str(tmp_path / "out"), *inputs]
    args += ["--short-side", "0", "--batch-size", "2", "--threshold", "0"]
    # The first batch (both small) fails as a whole, then image by image; the large one runs.
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "small.png: two-stage Deformable DETR takes its 20 queries" in err
    assert "small2.png: two-stage" in err
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [Path(image["file_name"]).name for image in images] == ["large.png"]


def test_bad_devices_and_eval_settings_are_named(tmp_path, capsys):
    detrkit.save(detrkit.build_model("detr_digits"), tmp_path / "model")
    weights = ["--weights", str(tmp_path / "model")]
    (tmp_path / "file").write_text("")
    bad = {
        ("--device", "banana"): "device 'banana' is not a device torch knows",
        ("--batch-size", "0"): "batch_size must be at least 1",
        ("--image-scale", "-1"): "image_scale must be positive",
        ("--out", str(tmp_path / "file")): "a file is there",
    }
    if not torch.cuda.is_available():
        bad[("--device", "cuda")] = "no CUDA GPU is available here"
    for option, message in bad.items():
        assert main(["eval", *weights, "--data", "digits", *option]) == 2
        assert message in capsys.readouterr().err
    predict = ["predict", *weights, str(tmp_path / "file"), "--out", str(tmp_path / "out")]
    assert main([*predict, "--device", "banana"]) == 2
    assert "device 'banana'" in capsys.readouterr().err

"""``detrkit convert CKPT --to transformers OUT`` and ``save_transformers``: the written directory
loads with transformers itself, which computes detrkit's outputs; reading it back gives the same
weights."""

from __future__ import annotations

import json

import pytest
import torch

import detrkit
from detrkit.checkpoints.huggingface import save_transformers
from detrkit.cli.main import main
from helpers import padded_batch, tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

NAMES = ["cat", "dog", "bird"]
ATOL = 1e-4


def load_hf(directory, cls):
    hf, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return hf.eval()


def assert_same_weights(model, directory):
    back = detrkit.load(directory)
    assert back.config.class_names == NAMES
    ours, theirs = model.state_dict(), back.state_dict()
    counter = "num_batches_tracked"  # transformers' frozen batch norm keeps none
    assert {k for k in ours if not k.endswith(counter)} == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_detr_loads_in_transformers_with_the_same_outputs(tmp_path):
    model = tiny_model("detr", class_names=NAMES, dec_layers=2)
    save_transformers(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DetrForObjectDetection"]
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}
    hf = load_hf(tmp_path, transformers.DetrForObjectDetection)
    assert hf.config.label2id == {"cat": 0, "dog": 1, "bird": 2}
    images, mask = padded_batch()
    with torch.no_grad():
        ours = model(images, mask)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
    torch.testing.assert_close(theirs.logits, ours["pred_logits"], rtol=0, atol=ATOL)
    torch.testing.assert_close(theirs.pred_boxes, ours["pred_boxes"], rtol=0, atol=ATOL)
    assert_same_weights(model, tmp_path)


@pytest.mark.parametrize("name", ["deformable", "deformable_refine", "deformable_two_stage"])
def test_deformable_detr_loads_in_transformers_with_the_same_outputs(tmp_path, name):
    # tiny_model perturbs every layer's head on its own: the refined variants' per-layer class
    # heads differ, and transformers keeps them apart (no tying).
    model = tiny_model(name, class_names=NAMES)
    save_transformers(model, tmp_path)
    hf = load_hf(tmp_path, transformers.DeformableDetrForObjectDetection)
    assert hf.config.num_feature_levels == model.config.num_feature_levels
    images, mask = padded_batch()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.no_grad():
        ours = model(images, mask)
        # labels make transformers return its per-layer outputs (its loss is ignored)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=labels * 2)

    def same(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)

    same(theirs.logits, ours["pred_logits"])
    same(theirs.pred_boxes, ours["pred_boxes"])
    assert len(theirs.auxiliary_outputs) == len(ours["aux_outputs"])
    for hf_aux, aux in zip(theirs.auxiliary_outputs, ours["aux_outputs"], strict=True):
        same(hf_aux["logits"], aux["pred_logits"])
        same(hf_aux["pred_boxes"], aux["pred_boxes"])
    assert_same_weights(model, tmp_path)


def test_detr_segmentation_loads_as_detr_for_segmentation(tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(
        "detr_digits_panoptic", enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=5
    ).eval()
    save_transformers(model, tmp_path)
    hf = load_hf(tmp_path, transformers.DetrForSegmentation)
    images, mask = padded_batch()
    with torch.no_grad():
        ours = model(images, mask)
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long())
    torch.testing.assert_close(theirs.logits, ours["pred_logits"], rtol=0, atol=ATOL)
    torch.testing.assert_close(theirs.pred_masks, ours["pred_masks"], rtol=0, atol=ATOL)


def test_a_pre_norm_detr_is_refused_before_anything_is_written(tmp_path):
    model = tiny_model("detr", pre_norm=True)
    with pytest.raises(ValueError, match="pre-norm"):
        save_transformers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_converts_and_refuses_bad_input(tmp_path, capsys):
    model = tiny_model("detr", class_names=NAMES)
    detrkit.save(model, tmp_path / "native")
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "native"), "--to", "transformers", str(out)]) == 0
    assert "DetrForObjectDetection" in capsys.readouterr().out
    load_hf(out, transformers.DetrForObjectDetection)
    capsys.readouterr()  # transformers' progress bar

    def error(args):
        assert main(args) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message
        return message

    # an earlier result is not replaced unasked; --overwrite replaces it
    assert "--overwrite" in error(
        ["convert", str(tmp_path / "native"), "--to", "transformers", str(out)]
    )
    assert (
        main(["convert", str(tmp_path / "native"), "--to", "transformers", str(out), "--overwrite"])
        == 0
    )
    assert "no such file" in error(
        ["convert", str(tmp_path / "nope"), "--to", "transformers", str(tmp_path / "x")]
    )
    detrkit.save(tiny_model("detr", pre_norm=True), tmp_path / "pre_norm")
    assert "pre-norm" in error(
        ["convert", str(tmp_path / "pre_norm"), "--to", "transformers", str(tmp_path / "y")]
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_processor_resizes_as_the_training_run_did(tmp_path, capsys):
    """A run at image_scale 0.1: transformers' processor gets short side 80 and long side 133,
    as detrkit's Detector would resize; --short-side / --max-size override it, and only
    --to transformers takes them."""
    model = tiny_model("detr", class_names=NAMES)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    torch.save(checkpoint, run / "checkpoint.pth")
    (run / "config.json").write_text(
        json.dumps({"model": "detr_digits", "data": "digits", "image_scale": 0.1})
    )
    weights = str(run / "checkpoint.pth")

    def processor_size(out, *options):
        assert main(["convert", weights, "--to", "transformers", str(out), *options]) == 0
        processor = transformers.AutoImageProcessor.from_pretrained(out)
        return processor.size["shortest_edge"], processor.size["longest_edge"]

    assert processor_size(tmp_path / "scaled") == (80, 133)
    assert "short side 80, long side at most 133 (image_scale 0.1" in capsys.readouterr().err
    assert processor_size(tmp_path / "given", "--short-side", "64", "--max-size", "100") == (
        64,
        100,
    )
    assert "image_scale" not in capsys.readouterr().err
    for refused in (
        ["--to", "transformers", str(tmp_path / "keep"), "--short-side", "0"],
        ["--to", "detrkit", str(tmp_path / "native"), "--short-side", "64"],
    ):
        assert main(["convert", weights, *refused]) == 2
        assert "--short-side" in capsys.readouterr().err
    assert not (tmp_path / "keep").exists() and not (tmp_path / "native").exists()

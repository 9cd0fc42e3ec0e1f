"""The DETR model's building blocks and interface."""

from __future__ import annotations

import pytest
import torch

import detrkit
from detrkit import pad_images
from detrkit.cli.arguments import model_option
from detrkit.models import build_config
from detrkit.models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from helpers import small_detr


def test_sine_encoding_ignores_padding():
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded = torch.ones(1, 10, 12, dtype=torch.bool)
    padded[:, :6, :8] = False
    sine = PositionEmbeddingSine(16)
    torch.testing.assert_close(sine(padded)[..., :6, :8], sine(mask), rtol=0, atol=0)


def test_sine_encoding_values():
    # Normalised positions: the last unpadded row/column sits at 2*pi; features pair sin and cos.
    encoding = PositionEmbeddingSine(4, temperature=100.0)(torch.zeros(1, 2, 4, dtype=torch.bool))
    assert encoding.shape == (1, 8, 2, 4)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * torch.pi  # rows
    torch.testing.assert_close(encoding[0, 0, :, 0], y.sin())
    torch.testing.assert_close(encoding[0, 1, :, 0], y.cos())
    torch.testing.assert_close(encoding[0, 2, :, 0], (y / 10).sin())  # 100 ** (2 * 1 / 4)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]) / (4 + 1e-6) * 2 * torch.pi  # columns, after y
    torch.testing.assert_close(encoding[0, 4, 0, :], x.sin())


def test_learned_encoding_layout_and_limit():
    learned = PositionEmbeddingLearned(8)
    encoding = learned(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert encoding.shape == (2, 16, 3, 5)
    torch.testing.assert_close(encoding[0, :8, 1, 4], learned.col_embed.weight[4])  # x first
    torch.testing.assert_close(encoding[1, 8:, 2, 0], learned.row_embed.weight[2])
    with pytest.raises(ValueError, match="up to 50x50"):
        learned(torch.zeros(1, 51, 5, dtype=torch.bool))


def test_pad_images():
    images, mask = pad_images([torch.ones(3, 4, 6), torch.full((3, 5, 2), 2.0)])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert mask[0, :4, :].logical_not().all() and mask[0, 4].all()
    assert mask[1, :, 2:].all() and not mask[1, :, :2].any()
    assert images[1, :, :, 2:].abs().sum() == 0 and images[1, :, :, :2].eq(2).all()
    with pytest.raises(ValueError, match="image 1 has shape"):
        pad_images([torch.ones(3, 4, 4), torch.ones(4, 4)])
    with pytest.raises(ValueError, match=r"image 1 .*differs from image 0"):
        pad_images([torch.ones(3, 4, 4), torch.ones(1, 4, 4)])
    with pytest.raises(ValueError, match="at least one"):
        pad_images([])


def test_outputs_and_default_mask():
    model = small_detr().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        explicit = model(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert out["pred_logits"].shape == (2, 12, 8)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 2
    torch.testing.assert_close(out["pred_logits"], explicit["pred_logits"], rtol=0, atol=0)


def test_padding_does_not_leak_into_the_transformer():
    """The encoder and decoder never attend to padded positions: changing what the padding holds
    changes nothing."""
    model = small_detr().eval()
    images, mask = pad_images([torch.randn(3, 64, 64), torch.randn(3, 32, 64)])
    captured = []
    model.input_proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        first = model(images, mask)
        # Same features at valid positions, garbage in the padded ones.
        garbage = captured[0].clone()
        garbage[1, :, 1:, :] = 1e3
        model.input_proj.register_forward_hook(lambda _m, _i, _out: garbage)
        second = model(images, mask)
    padded_rows = mask[1, ::32].all(-1)
    assert padded_rows.tolist() == [False, True]
    torch.testing.assert_close(first["pred_logits"], second["pred_logits"], rtol=0, atol=1e-5)


def test_pre_norm_variant_has_encoder_norm():
    model = small_detr(pre_norm=True)
    assert "transformer.encoder.norm.weight" in model.state_dict()
    assert "transformer.encoder.norm.weight" not in small_detr().state_dict()


def test_build_model_presets_and_errors():
    presets = ["detr_r50", "detr_r50_dc5", "detr_r101", "detr_r101_dc5", "detr_digits"]
    presets += ["deformable_detr", "deformable_detr_single_scale", "deformable_detr_refine"]
    presets += ["deformable_detr_two_stage", "deformable_detr_digits"]
    presets += ["detr_r50_panoptic", "detr_r50_dc5_panoptic", "detr_r101_panoptic"]
    presets += ["detr_digits_panoptic"]
    assert detrkit.available_models() == sorted(presets)
    model = detrkit.build_model("detr_r50_dc5", num_classes=3, enc_layers=1, dec_layers=1)
    assert model.config.dilation and model.class_embed.out_features == 4
    layer4 = model.backbone[0].body["layer4"]
    assert layer4[0].conv2.stride == (1, 1) and layer4[1].conv2.dilation == (2, 2)
    assert model.backbone[0].strides == [16]
    with pytest.raises(ValueError, match="unknown model 'detr_r18'"):
        detrkit.build_model("detr_r18")
    with pytest.raises(ValueError, match="unknown options for detr_r50: num_clases"):
        detrkit.build_model("detr_r50", num_clases=3)
    with pytest.raises(ValueError, match="divisible by nheads"):
        detrkit.build_model("detr_r50", nheads=7)
    # Values of the wrong kind are refused by name; a string "False" is not false.
    wrong = {"two_stage": "False", "num_queries": "abc", "dropout": True, "class_names": [1, 2]}
    for name, value in wrong.items():
        with pytest.raises(ValueError, match=f"{name} must be"):
            build_config("deformable_detr", **{name: value})
    assert build_config(
        "detr_r50", dropout=0, class_names=("a", "b"), num_classes=2
    ).class_names == [
        "a",
        "b",
    ]


def test_command_linemodel_options_take_python_and_json_booleans():
    assert model_option("two_stage=False") == ("two_stage", False)
    assert model_option("two_stage=true") == ("two_stage", True)
    assert model_option("num_queries=50") == ("num_queries", 50)
    assert model_option("backbone=resnet18") == ("backbone", "resnet18")

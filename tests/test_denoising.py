"""Denoising training (DN-DETR): the queries, their attention mask, their loss and the option."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import detrkit
from detrkit.fast import optimize_for_training
from detrkit.loss import build_criterion
from detrkit.loss.denoising import Denoiser
from detrkit.models import model_from_config
from detrkit.models.denoising import denoising_attention_mask

TINY = dict(hidden_dim=32, nheads=4, dim_feedforward=64, num_queries=10, enc_layers=1)
TINY.update(dec_layers=2, num_classes=5, dropout=0.0)

# The variants covered: the demo's (two-stage, box refinement), refinement alone, plain
# Deformable DETR, DETR.
VARIANTS = {
    "two_stage": ("deformable_detr_digits", dict(two_stage=True)),
    "refine": ("deformable_detr_digits", {}),
    "plain": (
        "deformable_detr",
        dict(backbone="resnet18", num_feature_levels=2, backbone_norm="batch"),
    ),
    "detr": ("detr_r50", dict(backbone="resnet18")),
}


def build(variant: str, seed: int = 0) -> torch.nn.Module:
    preset, options = VARIANTS[variant]
    torch.manual_seed(seed)
    model = detrkit.build_model(preset, **TINY, **options)
    # Away from the original initialisation (zeroed box heads), so that every path shows.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def targets() -> list[dict]:
    """Two images with different object counts (the second image's groups are padded)."""
    return [
        {
            "labels": torch.tensor([1, 3, 0]),
            "boxes": torch.tensor(
                [[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]
            ),
        },
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.3, 0.25, 0.2]])},
    ]


def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image is padded
    return images, mask


def denoiser_for(model, groups: int = 3) -> Denoiser:
    torch.manual_seed(5)
    return Denoiser(model.config, groups=groups)


def test_attention_mask_blocks_other_groups_and_hides_padding():
    mask = denoising_attention_mask([2, 1], groups=2, num_queries=3)
    assert mask.shape == (2, 7, 7)
    allowed = ~mask[0]
    assert not allowed[4:, :4].any()  # object queries never see the denoising part
    assert allowed[4:, 4:].all()
    assert allowed[:2, :2].all() and not allowed[:2, 2:4].any()  # group 0 sees itself only
    assert allowed[:4, 4:].all()  # and the object queries
    # Image 1 has one object: slot 1 of each group is padding, seen by itself only.
    assert not mask[1][:, 1].logical_not().logical_and(torch.arange(7) != 1).any()
    assert not mask[1][1, 1] and not mask[1][3, 3]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_object_queries_do_not_see_the_denoising_queries(variant):
    model = build(variant)
    x, mask = images()
    with torch.no_grad():
        plain = model(x, mask)
        dn = denoiser_for(model)(model, targets())
        noised = model(x, mask, denoising=dn)
    assert dn.num_queries == 3 * 3
    assert noised["dn_outputs"]["pred_boxes"].shape == (2, 9, 4)
    assert len(noised["dn_outputs"]["aux_outputs"]) == 1
    torch.testing.assert_close(noised["pred_logits"], plain["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(noised["pred_boxes"], plain["pred_boxes"], rtol=0, atol=1e-6)
    for got, want in zip(noised["aux_outputs"], plain["aux_outputs"]):
        torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["two_stage", "detr"])
def test_each_group_is_isolated_from_the_others(variant):
    model = build(variant)
    x, mask = images()
    with torch.no_grad():
        dn = denoiser_for(model)(model, targets())
        before = model(x, mask, denoising=dn)["dn_outputs"]
        size = dn.group_size
        perturbed = dataclasses.replace(dn, content=dn.content.clone())
        perturbed.content[:, size : 2 * size] += 1.0  # group 1 only
        # The padding slot of image 1 (its slots 1, 2 of group 0) too: nobody else sees it.
        perturbed.content[1, 1:size] -= 3.0
        after = model(x, mask, denoising=perturbed)["dn_outputs"]
    changed = (after["pred_boxes"] - before["pred_boxes"]).abs().amax(-1)  # [B, D]
    assert changed[:, size : 2 * size].amax() > 1e-4
    others = torch.cat([changed[0, :size], changed[1, :1], changed[:, 2 * size :].flatten()])
    assert others.amax() < 1e-6


def test_loss_of_perfect_denoising_is_zero():
    model = build("two_stage")
    criterion = build_criterion(model.config)
    dn = denoiser_for(model)(model, targets())
    # Predictions that give back every object exactly, with confident classes.
    logits = torch.full((2, dn.num_queries, 5), -30.0)
    boxes = torch.full((2, dn.num_queries, 4), 0.5)
    flat = [targets()[b] for b in dn.batch_index.tolist()]
    labels = torch.stack([t["labels"][j] for t, j in zip(flat, dn.target_index.tolist())])
    logits[dn.batch_index, dn.query_index, labels] = 30.0
    boxes[dn.batch_index, dn.query_index] = torch.stack(
        [t["boxes"][j] for t, j in zip(flat, dn.target_index.tolist())]
    )
    with torch.no_grad():
        outputs = model(*images())
    outputs["dn_outputs"] = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}
    losses = criterion(outputs, targets(), denoising=dn)
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        assert losses[name].item() < 1e-6, name
    assert "loss_ce_dn_0" not in losses


@pytest.mark.parametrize("variant", ["two_stage", "refine", "detr"])
def test_gradients_reach_the_denoiser(variant):
    model = build(variant)
    criterion = build_criterion(model.config)
    denoiser = denoiser_for(model)
    model.train()
    dn = denoiser(model, targets())
    losses = criterion(model(*images(), denoising=dn), targets(), denoising=dn)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"} <= set(losses)
    losses["loss"].backward()
    assert denoiser.label_embed.weight.grad[:5].abs().sum() > 0
    assert denoiser.label_embed.weight.grad[5].abs().sum() == 0  # padding: never trained
    if variant == "two_stage":
        assert not hasattr(denoiser, "position")  # the model's pos_trans places the boxes
    else:
        assert denoiser.position.layers[0].weight.grad.abs().sum() > 0


def test_state_dict_keys_do_not_change():
    model = build("two_stage")
    keys = list(model.state_dict())
    denoiser_for(model)(model, targets())
    assert list(model.state_dict()) == keys
    assert all(not name.startswith("label_embed") for name in keys)


@pytest.mark.parametrize("variant", ["two_stage", "plain", "detr"])
def test_fast_modules_agree_with_the_reference(variant):
    # Training mode, with dropout: the fast attention's own path (with its hashed dropout) runs
    # with the mask; dropout 0 compares the arithmetic.
    reference = build(variant)
    fast = optimize_for_training(build(variant))
    dn = denoiser_for(reference)(reference, targets())
    x, mask = images()
    with torch.no_grad():
        want = reference(x, mask, denoising=dn)
        got = fast(x, mask, denoising=dn)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            got["dn_outputs"][key], want["dn_outputs"][key], rtol=1e-4, atol=1e-5
        )


def test_fast_attention_applies_the_mask_in_its_fused_path():
    from detrkit.fast.attention import FastMultiheadAttention
    from detrkit.fast.substitution import adopt
    from detrkit.ops.fast_dropout import uses_fused_kernel

    # Dropout so small that nothing is dropped, but the fused path (training, p > 0) runs.
    p = 1e-7
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4, dropout=p, batch_first=True)
    fast = adopt(attention, FastMultiheadAttention).train()
    x = torch.randn(2, 7, 16)
    if not uses_fused_kernel(x, p, True):
        pytest.skip("no fused dropout kernel here")
    blocked = denoising_attention_mask([2, 1], groups=2, num_queries=3).repeat_interleave(4, 0)
    got = fast(x, x, x, need_weights=False, attn_mask=blocked)[0]
    want = attention.eval()(x, x, x, need_weights=False, attn_mask=blocked)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- `detrkit train --denoising` ---------------------------------------------------------------


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_denoising_logs_its_losses_resumes_and_keeps_the_checkpoint(tmp_path):
    from detrkit.cli.main import main
    from detrkit.engine.state import load_training_state
    from helpers import tiny_args

    dn = ["--denoising", "2", "--max-steps-per-epoch", "2", "--model-option=two_stage=true"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main(tiny_args(resumed, *dn, "--epochs", "1")) == 0
    train_records = [r for r in read_metrics(resumed) if r["type"] == "train"]
    assert train_records
    for record in train_records:  # the final layer's denoising losses, not the earlier layers'
        assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= set(record)
        assert not any(name.startswith("loss_ce_dn_") for name in record)
    first = load_training_state(resumed / "checkpoint.pth")
    assert set(first["denoising"]) == {"label_embed.weight"}  # two-stage: pos_trans positions

    # The model in the checkpoint is the model of a run without denoising.
    model = detrkit.load(resumed / "checkpoint.pth")
    fresh = model_from_config(model.config)  # as a run without denoising would write it
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    assert list(first["model"]) == list(fresh.state_dict())
    assert {k: v.shape for k, v in first["model"].items()} == shapes
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 80))
    assert set(outputs) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_outputs"}

    # Resumed, the denoiser continues from its saved weights: the same run as one uninterrupted.
    assert main(["train", "--resume", str(resumed), "--epochs", "2"]) == 0
    assert main(tiny_args(straight, *dn, "--epochs", "2")) == 0
    done = load_training_state(resumed / "checkpoint.pth")
    expected = load_training_state(straight / "checkpoint.pth")
    assert done["epoch"] == expected["epoch"] == 2
    assert not torch.equal(
        done["denoising"]["label_embed.weight"], first["denoising"]["label_embed.weight"]
    )
    for name, value in expected["denoising"].items():
        torch.testing.assert_close(done["denoising"][name], value, rtol=0, atol=0)
    for name, value in expected["model"].items():
        torch.testing.assert_close(done["model"][name], value, rtol=0, atol=0, msg=name)


def test_denoising_options_are_checked():
    from detrkit.engine.config import TrainConfig

    with pytest.raises(ValueError, match="denoising must be a non-negative"):
        TrainConfig(denoising=-1).validate()
    with pytest.raises(ValueError, match=r"dn_box_noise must be in \[0, 1\)"):
        TrainConfig(dn_box_noise=1.0).validate()
    with pytest.raises(ValueError, match="not a panoptic model"):
        Denoiser(detrkit.build_model("detr_digits_panoptic").config)

"""Deformable DETR: initialisation, official checkpoints, training step, two-stage proposals,
focal loss and top-k post-processing."""

from __future__ import annotations

import math

import pytest
import torch

import detrkit
from detrkit import PostProcess, SetCriterion
from detrkit.loss import HungarianMatcher, build_criterion
from helpers import official_args, padded_batch, write_official

VARIANTS = {
    "deformable_detr": {},
    "deformable_detr_single_scale": {"num_feature_levels": 1},
    "deformable_detr_refine": {"with_box_refine": True},
    "deformable_detr_two_stage": {"with_box_refine": True, "two_stage": True},
}


def small_deformable(preset: str = "deformable_detr", **overrides):
    options = dict(enc_layers=2, dec_layers=3, num_queries=20, num_classes=6, dim_feedforward=64)
    options.update(overrides)
    torch.manual_seed(0)
    return detrkit.build_model(preset, **options)


def test_original_initialisation():
    model = small_deformable()
    attn = model.transformer.encoder.layers[0].self_attn
    offsets = attn.sampling_offsets.bias.view(8, 4, 4, 2)  # heads, levels, points, (x, y)
    # Head 0 looks right, head 2 down; point p is p + 1 pixels away; the same on every level.
    torch.testing.assert_close(offsets[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(offsets[2, 3, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert offsets.abs().amax(-1).eq(torch.arange(1.0, 5.0)).all()
    assert attn.sampling_offsets.weight.eq(0).all() and attn.attention_weights.weight.eq(0).all()
    # A prior probability of 0.01 for every class.
    torch.testing.assert_close(model.class_embed[0].bias.sigmoid(), torch.full((6,), 0.01))


@pytest.mark.parametrize("preset", list(VARIANTS))
def test_official_layout_round_trip(tmp_path, preset):
    model = small_deformable(preset, nheads=4, dec_n_points=2).eval()
    args = official_args(
        nheads=4,
        dec_n_points=2,
        enc_n_points=4,
        num_queries=20,
        num_feature_levels=VARIANTS[preset].get("num_feature_levels", 4),
    )
    loaded = detrkit.load(write_official(model, tmp_path / "ckpt.pth", args=args))
    for field, value in VARIANTS[preset].items():
        assert getattr(loaded.config, field) == value
    assert (loaded.config.nheads, loaded.config.dec_n_points) == (4, 2)
    images, mask = padded_batch()
    with torch.no_grad():
        expected, got = model(images, mask), loaded(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_refine_heads_are_independent_and_shared_heads_are_stored_once(tmp_path):
    refine = small_deformable("deformable_detr_refine")
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    plain = small_deformable()
    assert plain.class_embed[0] is plain.class_embed[2]
    detrkit.save(plain, tmp_path / "plain")
    from safetensors import safe_open

    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "class_embed.0.weight" in stored and "class_embed.1.weight" not in stored
    loaded = detrkit.load(tmp_path / "plain")
    assert loaded.class_embed[0] is loaded.class_embed[1]


def test_wrong_head_count_is_explained(tmp_path):
    model = small_deformable()
    path = write_official(model, tmp_path / "ckpt.pth", args=official_args(nheads=4))
    with pytest.raises(detrkit.CheckpointError, match="nheads x levels x points = 4 x 4 x 4"):
        detrkit.load(path)


@pytest.mark.parametrize("preset", ["deformable_detr", "deformable_detr_two_stage"])
def test_training_step_reaches_every_trainable_parameter(preset):
    model = small_deformable(preset).train()
    images, mask = padded_batch()
    targets = [
        {
            "labels": torch.tensor([1, 4]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    criterion = build_criterion(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Two steps: at initialisation the offset/weight projections and the box heads' last layers
    # are zero, which blocks the gradient of what feeds them (level embedding, first box layers)
    # until one update has been made, as in the original.
    for step in range(2):
        optimizer.zero_grad()
        losses = criterion(model(images, mask), targets)
        losses["loss"].backward()
        if step == 0:
            optimizer.step()
    if preset.endswith("two_stage"):
        assert losses["loss_ce_enc"] > 0
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []


def test_two_stage_on_images_too_small_for_its_proposals():
    """20 proposals need 20 encoder positions: a 16x16 image gives 4 + 1 + 1 + 1 = 7, which
    must raise a clear error rather than topk's index error."""
    model = small_deformable("deformable_detr_two_stage").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="too small for two_stage_num_proposals"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.bool))
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool))
    assert outputs["pred_boxes"].shape == (1, 20, 4)


def test_two_stage_proposals_on_a_padded_batch():
    """Padded positions and proposals near the border become +inf (in logit space) with zeroed
    memory; a padded batch gives finite outputs. As in the original (and transformers), the top-k
    ranks all positions by their score: a padded position that scores high yields a reference box
    at the corner (sigmoid(+inf) = 1), which the clamped inverse sigmoid keeps finite."""
    model = small_deformable("deformable_detr_two_stage").eval()
    transformer = model.transformer
    memory = torch.randn(2, 6 * 8 + 3 * 4, 256)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, :, 5:] = True
    mask_flatten = torch.cat([mask.flatten(1), mask[:, ::2, ::2].flatten(1)], 1)
    with torch.no_grad():
        output_memory, proposals = transformer.gen_encoder_output_proposals(
            memory, mask_flatten, [(6, 8), (3, 4)]
        )
    invalid = torch.isinf(proposals).all(-1)  # [B, S]
    assert invalid[mask_flatten].all()
    # The unpadded image: every centre and size lies within (0.01, 0.99), so all are valid.
    assert not invalid[0].any()
    expected_memory = transformer.enc_output_norm(transformer.enc_output(torch.zeros(256)))
    torch.testing.assert_close(output_memory[1, 5], expected_memory.detach())

    images = torch.randn(2, 3, 160, 160)
    image_mask = torch.zeros(2, 160, 160, dtype=torch.bool)
    image_mask[1, :, 48:] = True  # the second image is a narrow strip
    with torch.no_grad():
        outputs = model(images, image_mask)
    assert (
        torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_boxes"]).all()
    )
    assert torch.isfinite(outputs["enc_outputs"]["pred_logits"]).all()


def test_focal_matcher_and_loss_on_a_perfect_prediction():
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2]])
    targets = [{"labels": torch.tensor([2, 0]), "boxes": boxes}]
    logits = torch.full((1, 3, 4), -12.0)
    logits[0, 2, 2] = logits[0, 0, 0] = 12.0
    pred_boxes = torch.tensor([[[0.7, 0.6, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1], [0.3, 0.4, 0.2, 0.3]]])
    outputs = {"pred_logits": logits, "pred_boxes": pred_boxes}
    ((pred, tgt),) = HungarianMatcher(cost_class=2, focal=True)(outputs, targets)
    assert dict(zip(tgt.tolist(), pred.tolist())) == {0: 2, 1: 0}
    losses = SetCriterion(4, classification="focal")(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() == pytest.approx(0, abs=1e-6)
    assert losses["cardinality_error"].item() == 0


def test_focal_loss_by_hand():
    # One query, two classes, target class 1: logits 0 -> p = 0.5 for both classes.
    outputs = {
        "pred_logits": torch.zeros(1, 1, 2),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = SetCriterion(2, classification="focal")(outputs, targets)
    # Per class: alpha_t * (1 - p_t)^2 * -log(p_t) with p_t = 0.5; summed, per target box.
    positive = 0.25 * 0.25 * math.log(2)
    negative = 0.75 * 0.25 * math.log(2)
    assert losses["loss_ce"].item() == pytest.approx(positive + negative, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * losses["loss_ce"].item(), rel=1e-5)


def test_sigmoid_postprocess_takes_the_best_query_class_pairs():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0], [-4.0, -4.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1]]])
    postprocess = PostProcess.for_config(small_deformable().config)
    postprocess.num_select = 3
    (result,) = postprocess(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0, 0.5]).sigmoid())
    assert result["labels"].tolist() == [1, 0, 0]
    torch.testing.assert_close(
        result["boxes"],
        torch.tensor([[0.0, 0.0, 100.0, 50.0], [80.0, 40.0, 120.0, 60.0], [0.0, 0.0, 100.0, 50.0]]),
    )

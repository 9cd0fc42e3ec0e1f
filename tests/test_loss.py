"""Matcher, criterion and post-processing on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detrkit import HungarianMatcher, PostProcess, SetCriterion
from detrkit.loss.criterion import num_boxes_across_processes
from helpers import small_detr

NUM_CLASSES = 4  # logits have 5 entries, the last is "no object"


def confident_logits(classes: list[int], high: float = 20.0) -> torch.Tensor:
    """[Q, C+1] logits that put (almost) all probability on the given class per query."""
    logits = torch.full((len(classes), NUM_CLASSES + 1), -high)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = high
    return logits


def perfect_prediction():
    """Two images; every object is predicted exactly by some query, the rest say "no object"."""
    boxes0 = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2]])
    boxes1 = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    targets = [
        {"labels": torch.tensor([2, 0]), "boxes": boxes0},
        {"labels": torch.tensor([3]), "boxes": boxes1},
    ]
    pred_boxes = torch.rand(2, 4, 4) * 0.5 + 0.25
    pred_boxes[0, 3], pred_boxes[0, 1] = boxes0[0], boxes0[1]
    pred_boxes[1, 2] = boxes1[0]
    no_object = NUM_CLASSES
    logits = torch.stack(
        [
            confident_logits([no_object, 0, no_object, 2]),
            confident_logits([no_object, no_object, 3, no_object]),
        ]
    )
    return {"pred_logits": logits, "pred_boxes": pred_boxes}, targets


def test_matcher_finds_the_perfect_assignment():
    outputs, targets = perfect_prediction()
    (pred0, tgt0), (pred1, tgt1) = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt0.tolist(), pred0.tolist())) == {0: 3, 1: 1}
    assert dict(zip(tgt1.tolist(), pred1.tolist())) == {0: 2}


def test_matcher_without_targets():
    outputs, targets = perfect_prediction()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices[0][0]) == 2
    assert len(indices[1][0]) == len(indices[1][1]) == 0
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    assert all(len(p) == 0 for p, _ in HungarianMatcher()(outputs, empty))


def test_perfect_prediction_has_zero_box_losses():
    outputs, targets = perfect_prediction()
    losses = SetCriterion(NUM_CLASSES)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0
    assert losses["cardinality_error"].item() == 0


def test_losses_by_hand():
    # One image, two queries, one object of class 1 at (0.5, 0.5, 0.4, 0.4).
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    logits = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    losses = SetCriterion(NUM_CLASSES, eos_coef=0.1)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )

    # Query 0 is matched (class 1); query 1 is "no object", weighted 0.1.
    nll0 = -math.log(math.exp(2) / (4 + math.exp(2) + math.e - 1))
    nll1 = -math.log(math.exp(3) / (4 + math.exp(3)))
    assert losses["loss_ce"].item() == pytest.approx((nll0 + 0.1 * nll1) / 1.1, rel=1e-5)
    # L1 over (cx, cy, w, h): |0.2 - 0.4| * 2; the smaller box inside the larger: GIoU = IoU.
    assert losses["loss_bbox"].item() == pytest.approx(0.4, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.04 / 0.16, rel=1e-5)
    # Both queries predict an object (argmax 1 and "no object"): cardinality 1 vs 1.
    assert losses["cardinality_error"].item() == 0
    assert losses["loss"].item() == pytest.approx(
        losses["loss_ce"].item() + 5 * losses["loss_bbox"].item() + 2 * losses["loss_giou"].item(),
        rel=1e-6,
    )


def test_auxiliary_losses_and_total():
    outputs, targets = perfect_prediction()
    noisy = {"pred_logits": outputs["pred_logits"] * 0.1, "pred_boxes": outputs["pred_boxes"] * 0.9}
    outputs["aux_outputs"] = [noisy, noisy]
    losses = SetCriterion(NUM_CLASSES)(outputs, targets)
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    expected = sum(
        w * losses[name + suffix] for name, w in weights.items() for suffix in ("", "_0", "_1")
    )
    assert losses["loss_ce_0"] > 0 and losses["loss_bbox_1"] > 0
    assert "class_error_0" not in losses
    torch.testing.assert_close(losses["loss"], expected)


@pytest.mark.parametrize("classification", ["softmax", "focal"])
def test_non_finite_predictions_give_a_non_finite_loss(classification: str):
    """A diverging run's NaN predictions reach the loss, which the training loop checks and
    reports with its step, instead of failing inside scipy's assignment."""
    outputs, targets = perfect_prediction()
    if classification == "focal":  # sigmoids over the classes: no "no object" logit
        outputs["pred_logits"] = outputs["pred_logits"][..., :-1]
    outputs["pred_boxes"][0, 1] = float("nan")
    outputs["pred_logits"][1, 2, 0] = float("inf")
    losses = SetCriterion(NUM_CLASSES, classification=classification)(outputs, targets)
    assert not torch.isfinite(losses["loss"])


@pytest.mark.parametrize("classification", ["softmax", "focal"])
@pytest.mark.parametrize("bad_label", [-1, NUM_CLASSES, NUM_CLASSES + 3])
def test_labels_outside_the_classes_are_refused(classification: str, bad_label: int):
    outputs, targets = perfect_prediction()
    targets[1]["labels"] = torch.tensor([bad_label])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in 0..3"):
        SetCriterion(NUM_CLASSES, classification=classification)(outputs, targets)


def test_empty_targets_give_a_finite_loss_with_gradients():
    logits = torch.randn(2, 5, NUM_CLASSES + 1, requires_grad=True)
    boxes = torch.rand(2, 5, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(NUM_CLASSES)({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0  # every query is pushed towards "no object"


def test_gradients_reach_every_trainable_parameter():
    model = small_detr().train()
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    targets = [
        {
            "labels": torch.tensor([1, 4]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([6]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    losses = SetCriterion(model.config.num_classes)(model(images, mask), targets)
    losses["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = {n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0}
    # As in the original: the first decoder layer's self-attention reads all-zero content (queries
    # start empty) through zero-initialised biases, so at initialisation its projections and the
    # scale of the norm after it receive no gradient. Everything else does.
    first_self_attention = "transformer.decoder.layers.0."
    assert no_grad == {
        first_self_attention + "self_attn.in_proj_weight",
        first_self_attention + "self_attn.out_proj.weight",
        first_self_attention + "norm1.weight",
    }
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # The original trains layer2-4 of the backbone only; batch norm holds no parameters at all.
    assert frozen == {
        n
        for n in dict(model.named_parameters())
        if n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1"))
    }
    assert not any("bn" in n or "downsample.1" in n for n in dict(model.named_parameters()))


def _normaliser_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    boxes_here = [1, 3][rank]
    targets = [{"labels": torch.zeros(boxes_here, dtype=torch.int64)}]
    results[rank] = num_boxes_across_processes(targets, torch.device("cpu"))
    dist.destroy_process_group()


def test_number_of_boxes_is_averaged_across_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_normaliser_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: 2.0, 1: 2.0}
    assert num_boxes_across_processes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0


def test_postprocess_by_hand():
    logits = torch.tensor([[[1.0, 3.0, 0.0], [0.0, 0.0, 5.0]]])  # 2 classes + "no object"
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.1, 0.2]]])
    (result,) = PostProcess()(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]])
    )
    denominators = [math.e + math.exp(3) + 1, 2 + math.exp(5)]
    torch.testing.assert_close(
        result["scores"], torch.tensor([math.exp(3) / denominators[0], 1 / denominators[1]])
    )
    # "no object" is never reported: the second query's best real class is class 0 (tie -> first).
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[100.0, 50.0, 300.0, 150.0], [80.0, 130.0, 120.0, 170.0]])
    )

"""Hugging Face transformers' Deformable DETR, saved with save_pretrained, loads into detrkit and
computes the same outputs, with the fused operator and with the reference one.

transformers 5 ties the class heads of all decoder layers in the box-refinement variant (the
original has one per layer) and saves that head once; detrkit gives every layer a copy, which
reproduces transformers' outputs. Official checkpoints keep their independent heads.
"""

from __future__ import annotations

import pytest
import torch

import detrkit
from detrkit.ops import attention_implementation
from helpers import needs_fused, padded_batch, randomize

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "plain": {},
    "single_scale": {"num_feature_levels": 1},
    "refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved_hf_model(request, tmp_path_factory):
    pytest.importorskip("timm")
    config = transformers.DeformableDetrConfig(
        num_labels=5, auxiliary_loss=True, **VARIANTS[request.param]
    )
    torch.manual_seed(0)
    hf = transformers.DeformableDetrForObjectDetection(config).eval()
    randomize(hf)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)

    images, mask = padded_batch()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.no_grad():
        # Labels make transformers return its auxiliary outputs (and compute a loss we ignore).
        expected = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=labels * 2)
    return request.param, directory, expected


@pytest.mark.parametrize("implementation", [pytest.param("cpu", marks=needs_fused), "reference"])
def test_deformable_detr_matches_transformers(saved_hf_model, implementation):
    variant, directory, expected = saved_hf_model
    model = detrkit.load(directory)
    config = model.config
    assert config.num_classes == 5
    assert config.num_feature_levels == VARIANTS[variant].get("num_feature_levels", 4)
    assert config.with_box_refine == VARIANTS[variant].get("with_box_refine", False)
    assert config.two_stage == VARIANTS[variant].get("two_stage", False)
    images, mask = padded_batch()
    with torch.no_grad(), attention_implementation(implementation):
        ours = model(images, mask)
    atol = 1e-4
    order = query_order(ours, expected) if config.two_stage else slice(None)

    def same(actual, reference):
        torch.testing.assert_close(actual[order], reference, rtol=0, atol=atol)

    same(ours["pred_logits"], expected.logits)
    same(ours["pred_boxes"], expected.pred_boxes)
    assert len(ours["aux_outputs"]) == len(expected.auxiliary_outputs) == 5
    for aux, hf_aux in zip(ours["aux_outputs"], expected.auxiliary_outputs, strict=True):
        same(aux["pred_logits"], hf_aux["logits"])
        same(aux["pred_boxes"], hf_aux["pred_boxes"])
    if config.two_stage:
        enc = ours["enc_outputs"]
        torch.testing.assert_close(
            enc["pred_logits"], expected.enc_outputs_class, rtol=0, atol=atol
        )
        torch.testing.assert_close(
            enc["pred_boxes"], expected.enc_outputs_coord_logits.sigmoid(), rtol=0, atol=atol
        )


def query_order(ours: dict, expected, atol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage queries are the encoder's top-k proposals in score order; two proposals whose
    scores differ by rounding (1e-7 here with random weights) can come out swapped by another
    attention kernel. The index that puts our queries in transformers' order: each query where
    it is, unless it differs and a neighbour (up to 2 places away) matches instead."""
    ours_rows = torch.cat([ours["pred_logits"], ours["pred_boxes"]], -1)  # [B, Q, C + 4]
    hf_rows = torch.cat([expected.logits, expected.pred_boxes], -1)
    batch_size, num_queries = hf_rows.shape[:2]
    order = torch.arange(num_queries).repeat(batch_size, 1)  # [B, Q]
    for image in range(batch_size):
        for query in range(num_queries):
            if (ours_rows[image, query] - hf_rows[image, query]).abs().max() <= atol:
                continue
            near = range(max(0, query - 2), min(num_queries, query + 3))
            order[image, query] = min(
                near, key=lambda j: (ours_rows[image, j] - hf_rows[image, query]).abs().max()
            )
        assert sorted(order[image].tolist()) == list(range(num_queries))  # one to one
    batch = torch.arange(batch_size)[:, None].expand_as(order)
    return batch, order

"""DETR's mask head (detrkit.models.segmentation): the official panoptic parameter layout, and the
same logits, boxes and masks as transformers' DetrForSegmentation on the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import detrkit
from detrkit.checkpoints import CheckpointError
from detrkit.checkpoints.huggingface import convert_hf_state_dict
from detrkit.models import build_config
from detrkit.models.segmentation import DETRSegmentation
from helpers import padded_batch, randomize, shared_reference_file


def layout(model) -> list[str]:
    return [f"{name} {tuple(t.shape)}" for name, t in model.state_dict().items()]


def read_keys(name: str) -> list[str]:
    return [line.strip() for line in shared_reference_file(name).read_text().splitlines() if line]


def test_the_official_panoptic_layout():
    """R50 with 250 classes: the official checkpoint's names and shapes, in its order. DC5 has the
    same; R101 is the R101 detector under ``detr.`` with the same mask head."""
    official = read_keys("detr_r50_panoptic.keys")
    for preset in ("detr_r50", "detr_r50_dc5"):
        model = DETRSegmentation(build_config(preset, num_classes=250))
        assert layout(model) == official, preset
    r101 = layout(DETRSegmentation(build_config("detr_r101", num_classes=250)))
    head = [key for key in official if not key.startswith("detr.")]
    detector = [f"detr.{key}" for key in read_keys("detr_r101.keys")]
    # The detector file has 91 classes; the panoptic models 250.
    detector = [
        key.replace("(92, 256)", "(251, 256)").replace("(92,)", "(251,)")
        if key.startswith("detr.class_embed")
        else key
        for key in detector
    ]
    assert r101 == detector + head


def test_outputs_add_a_mask_per_query_at_stride_4():
    torch.manual_seed(0)
    config = build_config("detr_r50", enc_layers=1, dec_layers=2, num_queries=7, num_classes=4)
    model = DETRSegmentation(config).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        out = model(images, mask)
    batch, _, height, width = images.shape
    assert out["pred_masks"].shape == (batch, 7, height // 4, width // 4)
    assert out["pred_logits"].shape == (batch, 7, 5)
    assert len(out["aux_outputs"]) == 1
    assert torch.isfinite(out["pred_masks"]).all()


def test_matches_transformers_detr_for_segmentation(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    hf_config = transformers.DetrConfig(
        num_labels=5, auxiliary_loss=False, encoder_layers=2, decoder_layers=2, num_queries=9
    )
    torch.manual_seed(0)
    hf = transformers.DetrForSegmentation(hf_config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)

    model = detrkit.load(tmp_path)  # the directory, as save_pretrained wrote it
    assert isinstance(model, DETRSegmentation)
    assert (model.config.num_classes, model.config.num_queries) == (5, 9)
    weights = load_file(tmp_path / "model.safetensors")
    converted = convert_hf_state_dict(tmp_path, weights, "detr_segmentation")
    # transformers 5's own module names (its live state dict) convert to the same.
    live = convert_hf_state_dict(tmp_path, hf.state_dict(), "detr_segmentation")
    assert live.keys() == converted.keys()
    assert all(torch.equal(live[key], converted[key]) for key in live)

    images, mask = padded_batch()
    assert mask[1].any() and not mask[0].any()  # one image padded
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=(~mask).long())
        ours = model(images, mask)
    torch.testing.assert_close(ours["pred_logits"], expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["pred_boxes"], expected.pred_boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["pred_masks"], expected.pred_masks, rtol=0, atol=1e-4)


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"detr_segmentation model: mask_head\.extra\.weight"):
        convert_hf_state_dict(
            tmp_path, {"mask_head.extra.weight": torch.zeros(1)}, "detr_segmentation"
        )


def test_official_panoptic_checkpoints_load(tmp_path):
    """An official panoptic checkpoint (``{"model": state_dict}`` in the original's names) loads
    with detrkit.load, its config read off the weights, and computes what it computed."""
    torch.manual_seed(0)
    config = build_config("detr_r50_panoptic", enc_layers=1, dec_layers=2, num_queries=6)
    model = DETRSegmentation(config).eval()
    randomize(model)
    torch.save({"model": model.state_dict()}, tmp_path / "panoptic.pth")
    loaded = detrkit.load(tmp_path / "panoptic.pth").eval()
    assert isinstance(loaded.config, type(config))
    assert (loaded.config.num_classes, loaded.config.num_queries) == (250, 6)
    images, mask = padded_batch()
    with torch.no_grad():
        expected, ours = model(images, mask), loaded(images, mask)
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=0)
    # detrkit's own format keeps the kind.
    again = detrkit.load(detrkit.save(loaded, tmp_path / "native"))
    assert isinstance(again, DETRSegmentation) and again.config == loaded.config


def test_the_criterion_adds_the_mask_losses_and_trains_the_mask_head():
    """build_criterion of a panoptic model: the final layer's masks are matched and scored
    (focal and dice, weight 1 each), the auxiliary layers' boxes only; every parameter of the
    mask head gets a gradient; targets without masks are named."""
    from detrkit.loss import build_criterion

    torch.manual_seed(0)
    config = build_config("detr_r50_panoptic", enc_layers=1, dec_layers=2, num_queries=6)
    model = DETRSegmentation(config).train()
    criterion = build_criterion(config)
    images, mask = padded_batch()
    height, width = images.shape[-2:]
    masks = torch.zeros(2, 1, height, width)
    masks[0, 0, 10:40, 20:60] = 1
    masks[1, 0, 30:50, 10:30] = 1
    boxes = torch.tensor([[0.31, 0.39, 0.31, 0.47], [0.16, 0.63, 0.16, 0.31]])
    targets = [
        {"labels": torch.tensor([3]), "boxes": boxes[i : i + 1], "masks": masks[i]}
        for i in range(2)
    ]
    losses = criterion(model(images, mask), targets)
    assert {"loss_mask", "loss_dice"} <= set(losses) and "loss_mask_0" not in losses
    assert criterion.weight_dict["loss_mask"] == criterion.weight_dict["loss_dice"] == 1.0
    losses["loss"].backward()
    head = [
        name
        for name, p in model.named_parameters()
        if name.startswith(("mask_head", "bbox_attention"))
    ]
    assert head and all(model.get_parameter(name).grad is not None for name in head)
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'masks'"):
        criterion(
            model(images, mask), [{k: v for k, v in t.items() if k != "masks"} for t in targets]
        )


def test_a_mask_head_that_cannot_be_built_is_named():
    with pytest.raises(ValueError, match="hidden_dim a multiple of 128"):
        build_config("detr_r50_panoptic", hidden_dim=64, nheads=8)


def test_training_a_panoptic_model_on_boxes_alone_is_refused_naming_the_file(tmp_path, capsys):
    """A panoptic model trains on masks: COCO instances without segmentations are refused
    before anything is written, naming the file and an annotation."""
    from detrkit.cli.main import main
    from helpers import write_square_coco

    images, annotations = write_square_coco(tmp_path / "coco")
    data = f"coco:{images},{annotations},{images},{annotations}"
    run = ["train", "--model", "detr_digits_panoptic", "--data", data, "--workers", "0"]
    assert main([*run, "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert str(annotations) in error and "segmentation" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_mask_losses_match_transformers():
    """Focal and dice mask losses of matched queries, against transformers' ImageLoss, with
    images of two sizes (target masks padded) and unordered matches."""
    from transformers.loss.loss_for_object_detection import ImageLoss

    from detrkit.loss.masks import mask_losses

    generator = torch.Generator().manual_seed(0)
    pred_masks = torch.randn(2, 6, 12, 16, generator=generator)
    targets = [
        {"masks": (torch.rand(3, 48, 64, generator=generator) > 0.6).float()},
        {"masks": (torch.rand(2, 40, 56, generator=generator) > 0.5).float()},
    ]
    indices = [
        (torch.tensor([4, 0, 2]), torch.tensor([1, 2, 0])),
        (torch.tensor([5, 1]), torch.tensor([0, 1])),
    ]
    ours = mask_losses(pred_masks, targets, indices, num_boxes=5.0)
    reference = ImageLoss(None, 3, 0.1, ["masks"]).loss_masks(
        {"pred_masks": pred_masks}, targets, indices, 5.0
    )
    for name in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6)
    # Logits that are the target (at its size) leave almost no loss; their opposite, a dice
    # loss near 1 per mask.
    target = targets[0]["masks"][:2]  # [2, 48, 64]
    match = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    right = mask_losses((target * 40 - 20)[None], [{"masks": target}], match, 2.0)
    wrong = mask_losses((20 - target * 40)[None], [{"masks": target}], match, 2.0)
    assert right["loss_dice"] < 1e-3 and right["loss_mask"] < 1e-6
    assert wrong["loss_dice"] > 0.99 and wrong["loss_mask"] > 1.0

"""Backbone pre-training on digit crops (the CPU stand-in for ImageNet pre-training)."""

import pytest
import torch

from detrkit.data.digits import digit_crops, make_scene
from detrkit.engine.config import TrainConfig
from detrkit.engine.pretrain import pretrain_backbone
from detrkit.models.backbone import ResNetBackbone


def test_digit_crops_hold_every_digit_of_the_scenes_with_its_label():
    crops, labels = digit_crops("train", 6, seed=3, side=32)
    expected = torch.cat([torch.from_numpy(make_scene("train", i, 3).labels) for i in range(6)])
    assert crops.shape == (len(expected), 3, 32, 32) and crops.dtype == torch.uint8
    assert torch.equal(labels, expected)
    # Each crop shows its digit: the crop is not flat (ink of a contrasting colour is in it).
    assert (crops.float().flatten(1).std(1) > 10).all()


def test_pretraining_learns_to_classify_the_crops():
    torch.manual_seed(0)
    crops, labels = digit_crops("train", 40, seed=0, side=32)
    backbone = ResNetBackbone(
        "resnet18", return_layers=("layer2", "layer3", "layer4"), norm="batch"
    )
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    records = []
    pretrain_backbone(
        backbone,
        crops,
        labels,
        steps=60,
        batch_size=32,
        lr=2e-3,
        sizes=(32,),
        log=records.append,
        log_every=20,
    )
    assert [r["step"] for r in records] == [20, 40, 60]
    # From chance (90% wrong over 10 digits) to clearly learning, on the training crops.
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["accuracy"] > 0.4
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("body.layer4") for k in changed)


def test_pretraining_is_refused_outside_the_digits():
    config = TrainConfig(data="coco:a,b,c,d", backbone_pretrain_steps=10)
    with pytest.raises(ValueError, match="backbone_pretrain_steps"):
        config.validate()
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(backbone_pretrain_steps=-1).validate()

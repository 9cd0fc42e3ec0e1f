"""Hugging Face transformers' DETR, saved with save_pretrained, loads into detrkit and computes the
same outputs.

transformers differs from the original in one place: with ``auxiliary_loss=True`` its decoder feeds
each layer the *normalised* output of the previous one (and normalises the last one twice), where
the original normalises only the copy used for prediction. detrkit follows the original, so these
tests run transformers with ``auxiliary_loss=False`` (the original computation) and rebuild its
per-layer predictions from hooks on its decoder layers.
"""

from __future__ import annotations

import pytest
import torch

import detrkit
from helpers import padded_batch, randomize

transformers = pytest.importorskip("transformers")


def hf_outputs(hf, images, mask):
    """Final and per-layer predictions of a transformers DetrForObjectDetection."""
    layer_outputs = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: layer_outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in hf.model.decoder.layers
    ]
    with torch.no_grad():
        out = hf(pixel_values=images, pixel_mask=(~mask).long())
        per_layer = torch.stack([hf.model.decoder.layernorm(h) for h in layer_outputs])
        logits = hf.class_labels_classifier(per_layer)
        boxes = hf.bbox_predictor(per_layer).sigmoid()
    for hook in hooks:
        hook.remove()
    return out, logits, boxes


@pytest.mark.parametrize(
    ("backbone", "position"), [("timm", "sine"), ("hf_resnet", "sine"), ("timm", "learned")]
)
def test_detr_matches_transformers(tmp_path, backbone, position):
    pytest.importorskip("timm")
    kwargs = {}
    if backbone == "hf_resnet":
        kwargs["backbone_config"] = transformers.ResNetConfig(out_features=["stage4"])
    config = transformers.DetrConfig(
        num_labels=5, auxiliary_loss=False, position_embedding_type=position, **kwargs
    )
    torch.manual_seed(0)
    hf = transformers.DetrForObjectDetection(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)

    model = detrkit.load(tmp_path)
    assert model.config.num_classes == 5
    assert model.config.position_embedding == position

    images, mask = padded_batch()
    assert mask[1].any() and not mask[0].any()
    expected, layer_logits, layer_boxes = hf_outputs(hf, images, mask)
    with torch.no_grad():
        ours = model(images, mask)

    torch.testing.assert_close(ours["pred_logits"], expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["pred_boxes"], expected.pred_boxes, rtol=0, atol=1e-4)
    assert len(ours["aux_outputs"]) == config.decoder_layers - 1
    for i, aux in enumerate(ours["aux_outputs"]):
        torch.testing.assert_close(aux["pred_logits"], layer_logits[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(aux["pred_boxes"], layer_boxes[i], rtol=0, atol=1e-4)
    # The final layer's prediction, rebuilt from the hooks, is transformers' own final output.
    torch.testing.assert_close(layer_logits[-1], expected.logits, rtol=0, atol=1e-6)


def test_class_names_come_from_id2label(tmp_path):
    names = {0: "cat", 1: "dog", 2: "bird"}
    config = transformers.DetrConfig(
        id2label=names,
        label2id={v: k for k, v in names.items()},
        encoder_layers=1,
        decoder_layers=1,
    )
    transformers.DetrForObjectDetection(config).save_pretrained(tmp_path)
    model = detrkit.load(tmp_path)
    assert model.config.class_names == ["cat", "dog", "bird"]
    assert (model.config.enc_layers, model.config.dec_layers) == (1, 1)

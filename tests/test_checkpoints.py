"""Loading and saving: official files, detrkit's format, and every kind of bad input."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

import detrkit
from detrkit import CheckpointError
from helpers import official_args, padded_batch, small_detr, write_official


def outputs_of(model):
    images, mask = padded_batch()
    with torch.no_grad():
        return model.eval()(images, mask)


def assert_same_outputs(a, b):
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    for x, y in zip(a["aux_outputs"], b["aux_outputs"], strict=True):
        torch.testing.assert_close(x["pred_logits"], y["pred_logits"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "args_values", "bare"),
    [
        ({}, {}, False),
        ({"dilation": True}, {"dilation": True}, False),  # DC5: only args can tell
        ({"nheads": 4, "pre_norm": True, "position_embedding": "learned"}, {"nheads": 4}, False),
        ({}, None, True),  # a bare state dict: the variant comes from the weights alone
    ],
)
def test_official_layout_round_trip(tmp_path, overrides, args_values, bare):
    model = small_detr(**overrides)
    args = None if args_values is None else official_args(**args_values)
    path = write_official(model, tmp_path / "detr.pth", args=args, bare=bare)

    loaded = detrkit.load(path)
    assert not loaded.training
    for field in (
        "dilation",
        "nheads",
        "pre_norm",
        "position_embedding",
        "enc_layers",
        "dec_layers",
        "num_queries",
        "num_classes",
        "dim_feedforward",
        "backbone",
    ):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert_same_outputs(outputs_of(loaded), outputs_of(model))


@pytest.mark.parametrize("backbone", ["resnet101", "resnet18", "resnet34"])
def test_backbone_depth_is_recognised_from_its_weights(tmp_path, backbone):
    model = detrkit.build_model(
        "detr_r50", backbone=backbone, enc_layers=1, dec_layers=1, dim_feedforward=32
    )
    loaded = detrkit.load(write_official(model, tmp_path / f"{backbone}.pth", bare=True))
    assert loaded.config.backbone == backbone


def test_bare_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    model = small_detr()
    save_file(model.state_dict(), tmp_path / "detr.safetensors")
    assert_same_outputs(outputs_of(detrkit.load(tmp_path / "detr.safetensors")), outputs_of(model))


def test_native_round_trip(tmp_path):
    model = small_detr(class_names=[f"c{i}" for i in range(7)])
    detrkit.save(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["detrkit.json", "model.safetensors"]
    # Written through private temporary files, yet with a new file's usual mode.
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("detrkit.json", "model.safetensors"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = detrkit.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_outputs(outputs_of(loaded), outputs_of(model))

    # Each file is replaced atomically, the pair is not: a save interrupted between the two
    # (new weights, old config) is found out instead of loading with the wrong class names.
    old_config = (tmp_path / "ckpt" / "detrkit.json").read_text()
    detrkit.save(small_detr(class_names=[f"d{i}" for i in range(7)]), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "detrkit.json").write_text(old_config)
    with pytest.raises(CheckpointError, match=r"saved with another config.*interrupted save"):
        detrkit.load(tmp_path / "ckpt")


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such file"):
        detrkit.load("/nonexistent/detr.pth")


def test_truncated_and_corrupt_files(tmp_path):
    path = write_official(small_detr(), tmp_path / "good.pth", args=official_args())
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    generator = random.Random(0)
    corrupt = []
    for i in range(30):  # random bytes, some behind a pickle's or a zip file's first bytes
        blob = bytes(generator.randrange(256) for _ in range(512))
        corrupt.append(tmp_path / f"corrupt{i}.pth")
        corrupt[-1].write_bytes([b"", b"\x80\x02", b"PK\x03\x04"][i % 3] + blob)
    for bad in (truncated, *corrupt):
        with pytest.raises(CheckpointError, match=f"{bad.name}: not a readable PyTorch checkpoint"):
            detrkit.load(bad)

    detrkit.save(small_detr(), tmp_path / "native")
    weights = tmp_path / "native" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        detrkit.load(tmp_path / "native")
    (tmp_path / "native" / "detrkit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"detrkit\.json"):
        detrkit.load(tmp_path / "native")


class RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"query_embed.weight": RunsCode(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # the legacy torch format
    with pytest.raises(CheckpointError, match=r"refused to unpickle: .*global \S*system"):
        detrkit.load(path)
    assert not marker.exists()


def test_malicious_hf_bin_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.DetrConfig(encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"class_labels_classifier.weight": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        detrkit.load(tmp_path)
    assert not marker.exists()


def test_unknown_formats(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="unknown format"):
        detrkit.load(tmp_path / "empty_dir")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="unknown format"):
        detrkit.load(tmp_path / "list.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "classifier.pth")
    with pytest.raises(CheckpointError, match="not a DETR"):
        detrkit.load(tmp_path / "classifier.pth")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state_dict = small_detr().state_dict()
    del state_dict["transformer.decoder.norm.weight"]
    state_dict["extra_head.weight"] = torch.zeros(3)
    torch.save({"model": state_dict, "args": official_args()}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as info:
        detrkit.load(tmp_path / "odd.pth")
    message = str(info.value)
    assert "odd.pth" in message
    assert "missing keys: transformer.decoder.norm.weight" in message
    assert "unexpected keys: extra_head.weight" in message


def test_new_number_of_classes(tmp_path):
    model = small_detr()
    path = write_official(model, tmp_path / "detr.pth", args=official_args())
    with pytest.raises(CheckpointError, match="reset_class_head=True") as info:
        detrkit.load(path, num_classes=3)
    assert "class_embed.weight (checkpoint (8, 256), model (4, 256))" in str(info.value)

    fine_tune = detrkit.load(path, num_classes=3, reset_class_head=True)
    assert fine_tune.class_embed.out_features == 4
    original = model.state_dict()
    for name, tensor in fine_tune.state_dict().items():
        if not name.startswith("class_embed."):
            assert torch.equal(tensor, original[name]), name


def test_a_detector_under_detr_without_a_mask_head_is_named(tmp_path):
    state_dict = {f"detr.{k}": v for k, v in small_detr().state_dict().items()}
    torch.save({"model": state_dict}, tmp_path / "panoptic.pth")
    with pytest.raises(CheckpointError, match="without a mask head"):
        detrkit.load(tmp_path / "panoptic.pth")

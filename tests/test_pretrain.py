"""Backbone pre-training on digit crops (the CPU stand-in for ImageNet pre-training)."""

import pytest
import torch

import detrkit
from detrkit.data.digits import digit_crops, make_scene
from detrkit.engine.config import TrainConfig
from detrkit.engine.pretrain import pretrain_backbone
from detrkit.engine.state import load_training_state
from detrkit.engine.train import train
from detrkit.models.backbone import ResNetBackbone
from helpers import TINY_MODEL


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
        steps=40,
        batch_size=32,
        lr=2e-3,
        sizes=(32,),
        log=records.append,
        log_every=20,
    )
    assert [r["step"] for r in records] == [20, 40]
    # From chance (10% right over 10 digits) to clearly learning, on the training crops.
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["accuracy"] > 0.5
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("body.layer4") for k in changed)


def test_pretraining_is_refused_outside_the_digits():
    config = TrainConfig(data="coco:a,b,c,d", backbone_pretrain_steps=10)
    with pytest.raises(ValueError, match="backbone_pretrain_steps"):
        config.validate()
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(backbone_pretrain_steps=-1).validate()
    with pytest.raises(ValueError, match="backbone_pretrain_images"):
        TrainConfig(backbone_pretrain_steps=10, backbone_pretrain_images=0).validate()


def test_short_pretraining_runs_at_a_constant_rate():
    # One-cycle cannot schedule under 20 steps; smoke runs of a few steps must still work.
    crops, labels = digit_crops("train", 4, seed=0, side=24)
    backbone = ResNetBackbone("resnet18", norm="batch")
    before = backbone.body["layer4"][1].conv2.weight.clone()
    for steps in (1, 5):
        accuracy = pretrain_backbone(backbone, crops, labels, steps, batch_size=4, sizes=(24,))
        assert 0.0 <= accuracy <= 1.0
    assert not torch.equal(backbone.body["layer4"][1].conv2.weight, before)


def test_freeze_as_pretrained_keeps_eval_outputs_and_fixes_the_first_layers():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", return_layers=("layer2", "layer4"), norm="batch")
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    backbone.train()
    for _ in range(3):  # running statistics away from their initial 0 and 1
        backbone(images * 3 + 1, mask)
    backbone.eval()
    with torch.no_grad():
        expected, _ = backbone(images, mask)
    backbone.freeze_as_pretrained()
    backbone.train()  # frozen batch norm ignores the mode
    with torch.no_grad():
        found, _ = backbone(images, mask)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    # The state is that of a norm="frozen" backbone: it loads into one strictly.
    frozen = ResNetBackbone("resnet18", return_layers=("layer2", "layer4"), norm="frozen")
    frozen.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        again, _ = frozen(images, mask)
    for a, b in zip(again, found):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # The frozen norms take the device and dtype the backbone has been moved to.
    moved = ResNetBackbone("resnet18", return_layers=("layer2",), norm="batch").double()
    moved.freeze_as_pretrained()
    assert {b.dtype for b in moved.buffers()} == {torch.float64}
    (features,), _ = moved(images.double(), mask)
    assert features.dtype == torch.float64


def _pretraining_run(tmp_path, **changes) -> TrainConfig:
    """A one-epoch run of the tiny model that pre-trains its backbone first."""
    settings = dict(
        model_options=TINY_MODEL,
        output=str(tmp_path / "run"),
        digits_train=6,
        digits_val=2,
        backbone_pretrain_steps=2,
        batch_size=2,
        epochs=1,
        image_scale=0.12,
        workers=0,
    )
    return TrainConfig(**{**settings, **changes})


def test_training_after_pretraining_saves_a_frozen_norm_model(tmp_path):
    config = _pretraining_run(tmp_path)
    run_dir = train(config)
    state = load_training_state(run_dir / "checkpoint.pth")
    assert state["model_config"]["backbone_norm"] == "frozen"
    model = detrkit.load(run_dir / "checkpoint.pth")  # strict: the layout matches the config
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # Resuming rebuilds the preset (trainable batch norm) and must freeze it the same way.
    train(config, resume=str(run_dir))


def test_pretraining_runs_its_forward_in_the_autocast_dtype():
    crops, labels = digit_crops("train", 4, seed=0, side=24)
    backbone = ResNetBackbone("resnet18", norm="batch")
    dtypes = []
    backbone.body["layer4"].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = backbone.body["layer4"][1].conv2.weight.clone()
    pretrain_backbone(
        backbone, crops, labels, 2, batch_size=4, sizes=(24,), autocast_dtype=torch.bfloat16
    )
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    weight = backbone.body["layer4"][1].conv2.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)


@pytest.mark.parametrize("hardware_bf16", [True, False])
def test_amp_auto_trains_in_bf16_only_where_the_hardware_computes_it(
    tmp_path, monkeypatch, capsys, hardware_bf16
):
    import detrkit.engine.evaluate as evaluate
    import detrkit.engine.train as engine

    monkeypatch.setattr(evaluate, "native_bf16", lambda device: hardware_bf16)
    seen = {"pretrain": [], "outputs": []}
    real_pretrain, real_criterion = engine.pretrain_backbone, engine.build_criterion

    def pretrain(*args, **kwargs):
        seen["pretrain"].append(kwargs["autocast_dtype"])
        return real_pretrain(*args, **kwargs)

    def criterion(config):
        built = real_criterion(config)
        built.register_forward_pre_hook(
            lambda m, args: seen["outputs"].append(args[0]["pred_logits"].dtype)
        )
        return built

    monkeypatch.setattr(engine, "pretrain_backbone", pretrain)
    monkeypatch.setattr(engine, "build_criterion", criterion)
    train(_pretraining_run(tmp_path, digits_train=4, backbone_pretrain_steps=1, amp="auto"))
    expected = torch.bfloat16 if hardware_bf16 else None
    assert seen["pretrain"] == [expected]
    assert set(seen["outputs"]) == {expected or torch.float32}
    chosen = "bf16" if hardware_bf16 else "off (no bf16 in hardware)"
    assert f"mixed precision (amp auto): {chosen} on cpu" in capsys.readouterr().out
    # The run's config keeps "auto": a resume on other hardware chooses again.
    assert load_training_state(tmp_path / "run" / "checkpoint.pth")["train_config"]["amp"] == "auto"


def test_fp16_pretraining_scales_its_gradients(monkeypatch):
    # fp16 gradients of a small loss underflow unless scaled, as the detector's are.
    scalers = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    crops, labels = digit_crops("train", 4, seed=0, side=24)
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False), (None, False)):
        backbone = ResNetBackbone("resnet18", norm="batch")
        before = backbone.body["layer4"][1].conv2.weight.clone()
        pretrain_backbone(
            backbone, crops, labels, 8, batch_size=4, sizes=(24,), autocast_dtype=dtype
        )
        # A scaler starts high and skips the steps whose scaled gradients overflow, halving its
        # scale each time, until they fit.
        scaler = scalers.pop()
        assert scaler.is_enabled() == scaled
        assert not scaled or scaler.get_scale() < 2.0**16
        weight = backbone.body["layer4"][1].conv2.weight
        assert torch.isfinite(weight).all() and not torch.equal(weight, before)


def test_native_bf16_on_gpus_means_ampere_or_newer(monkeypatch):
    import detrkit.ops.dispatch as dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capabilities = {0: (7, 5), 1: (8, 0)}  # a T4 emulates bf16; an A100 computes it
    monkeypatch.setattr(dispatch, "_gpu_capability", lambda index: capabilities[index])
    assert not dispatch.native_bf16(torch.device("cuda:0"))
    assert dispatch.native_bf16(torch.device("cuda:1"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dispatch.native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not dispatch.native_bf16(torch.device("cuda:1"))


def test_amp_choices_resolve_to_autocast_dtypes(monkeypatch):
    import detrkit.engine.evaluate as evaluate
    from detrkit.ops import native_bf16

    cpu = torch.device("cpu")
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(cpu) == expected
    assert not native_bf16(torch.device("meta"))
    for hardware_bf16 in (True, False):
        monkeypatch.setattr(evaluate, "native_bf16", lambda device, answer=hardware_bf16: answer)
        assert evaluate.amp_dtype("auto", cpu) == (torch.bfloat16 if hardware_bf16 else None)
        assert evaluate.amp_dtype("bf16", cpu) == torch.bfloat16
        assert evaluate.amp_dtype("none", cpu) is None
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16, auto, got 'x'"):
        evaluate.amp_dtype("x", cpu)
    TrainConfig(amp="auto").validate()
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16, auto, got 'x'"):
        TrainConfig(amp="x").validate()


def test_a_frozen_backbone_is_pre_trained_first_then_kept(tmp_path, monkeypatch):
    import detrkit.engine.train as engine

    snapshots = {}
    real_pretrain = engine.pretrain_backbone

    def pretrain(backbone, *args, **kwargs):
        snapshots["before"] = {k: v.clone() for k, v in backbone.state_dict().items()}
        accuracy = real_pretrain(backbone, *args, **kwargs)
        snapshots["after"] = {k: v.clone() for k, v in backbone.state_dict().items()}
        return accuracy

    monkeypatch.setattr(engine, "pretrain_backbone", pretrain)
    run_dir = train(_pretraining_run(tmp_path, freeze_backbone=True))
    trained = load_training_state(run_dir / "checkpoint.pth")["model"]
    name = "body.layer4.1.conv2.weight"  # trained by the pre-training, not by the detector's
    assert not torch.equal(snapshots["after"][name], snapshots["before"][name])
    for key, value in snapshots["after"].items():
        if "running" not in key and "num_batches" not in key:  # frozen norms keep their stats
            assert torch.equal(trained[f"backbone.0.{key}"], value), key

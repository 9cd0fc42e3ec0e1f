"""optimize_for_inference: folded batch norm, channels-last and lower precisions keep the answers,
and the options of Detector, ``detrkit predict`` and ``detrkit eval`` that use it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

import detrkit
from detrkit.cli.main import main
from detrkit.fast import adopt, chunking, optimize_for_inference
from detrkit.fast import transformer as fast_transformer
from detrkit.fast.backbone import (
    AccumulatingBottleneck,
    FastBottleneck,
    accumulate_pointwise,
    can_accumulate_pointwise,
    fold_batchnorms,
    fold_into_conv,
)
from detrkit.fast.chunking import ChunkedBatches, chunked, forward_in_chunks, images_per_chunk
from detrkit.fast.transformer import ChunkedDeformableEncoderLayer
from detrkit.inference import Detector
from detrkit.ops import attention_implementation, onednn
from helpers import padded_batch

# Small transformers on the real ResNet-50 with frozen batch norm, so that folding meets the
# modules of the published models.
SMALL = dict(hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=64)
MODELS = {
    "detr": ("detr_r50", dict(num_queries=10)),
    "deformable": ("deformable_detr", dict(num_queries=20, with_box_refine=True)),
}
# bf16 keeps 8 bits of mantissa: logits and normalised boxes of these random models move by
# about 0.04 and 0.005 from fp32 (measured); the bounds leave room for other inputs.
BF16_TOLERANCE = {"pred_logits": 0.15, "pred_boxes": 0.02}


def randomise_norms_and_heads(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics (fresh ones are the identity) and box heads (Deformable
    DETR's start at zero), so that what folding and precision change is visible."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                channels = module.running_var.shape[0]
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))
        for name, param in model.named_parameters():
            if "bbox_embed" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def small_model(kind: str, **overrides) -> nn.Module:
    preset, options = MODELS[kind]
    torch.manual_seed(0)
    model = detrkit.build_model(preset, **{**SMALL, **options, **overrides}).eval()
    return randomise_norms_and_heads(model)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {kind: small_model(kind) for kind in MODELS}


def run(model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> dict:
    with torch.inference_mode():
        return model(images, mask)


@pytest.mark.parametrize("kind", list(MODELS))
def test_fp32_keeps_the_answers_on_a_padded_batch(kind, models, monkeypatch):
    # Chunks of 100 tokens: the encoder MLP of Deformable DETR runs in several uneven chunks.
    monkeypatch.setattr(fast_transformer, "ENCODER_MLP_CHUNK", 100)
    model = models[kind]
    images, mask = padded_batch()
    assert mask[1].any()  # the second image is padded
    optimized = optimize_for_inference(model)
    # Chunks of one image: this batch also checks the split.
    monkeypatch.setattr(chunking, "CPU_PIXELS_PER_FORWARD", images[0, 0].numel())

    assert not any(isinstance(m, FrozenBatchNorm2d) for m in optimized.modules())
    stem = optimized.backbone[0].body["conv1"].weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    expected, got = run(model, images, mask), run(optimized, images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
    assert expected["pred_boxes"].std() > 0.01  # the boxes differ: the comparison means something


@pytest.mark.parametrize("kind", list(MODELS))
def test_each_option_alone_keeps_the_answers(kind, models):
    images, mask = padded_batch()
    expected = run(models[kind], images, mask)["pred_logits"]
    for options in (dict(channels_last=False), dict(fold_batchnorm=False), dict(winograd=False)):
        got = run(optimize_for_inference(models[kind], **options), images, mask)["pred_logits"]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_stays_within_its_tolerance(kind, models):
    images, mask = padded_batch()
    expected = run(models[kind], images, mask)
    got = run(optimize_for_inference(models[kind], "bf16"), images, mask)
    for key, tolerance in BF16_TOLERANCE.items():
        assert got[key].dtype == torch.bfloat16
        assert (got[key].float() - expected[key]).abs().max() < tolerance, key


@pytest.mark.skipif(
    onednn._operators() is None, reason="this torch build lacks oneDNN's fused operators"
)
@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_fuses_bias_and_relu_into_the_products(kind, models, monkeypatch):
    """The backbone's ReLU'd convolutions and the MLPs run as oneDNN operators with the ReLU and
    bias inside (detrkit.ops.onednn), with the outputs of the unfused model up to bf16 rounding."""
    images, mask = padded_batch()
    low = optimize_for_inference(models[kind], "bf16")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fused = run(low, images, mask)
    names = {event.name for event in profiler.events()}
    assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= names
    monkeypatch.setattr(onednn, "fuses", lambda module, x: False)
    plain = run(low, images, mask)
    for key, tolerance in BF16_TOLERANCE.items():
        # Measured: equal to the bit on an AMX Xeon; 0.006 on boxes on an AMD EPYC with AVX-512
        # BF16 but no AMX, whose oneDNN kernels round a bias added inside at another point.
        difference = (fused[key].float() - plain[key].float()).abs().max()
        assert difference < tolerance / 2, key


@pytest.mark.full
def test_compiled_deformable_detr_keeps_the_answers(models):
    """compile=True: inductor with frozen weights through the fused operator and the decoder's
    sampling-first attention, on a padded batch. About two minutes to compile here."""
    model = models["deformable"]
    images, mask = padded_batch()
    expected = run(model, images, mask)
    got = run(optimize_for_inference(model, compile=True), images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


@pytest.mark.full
def test_compiled_detr_keeps_the_answers_at_a_second_batch_size():
    """compile=True, then a batch of one image and a padded batch of two, which recompiles.
    inductor's frozen-weight Linear views its input as a matrix, which failed on the decoder
    attention's transposed output at batch sizes above one. About 45 s to compile here on a
    cold cache: with the other compiled models, in `make test-full`."""
    model = small_model("detr", enc_layers=1, dec_layers=1)
    compiled = optimize_for_inference(model, compile=True)
    images, mask = padded_batch()
    for batch in (1, 2):
        expected = run(model, images[:batch], mask[:batch])
        got = run(compiled, images[:batch], mask[:batch])
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("images_per_forward", [1, 2])
def test_batches_split_into_chunks_of_images_keep_every_output(images_per_forward, monkeypatch):
    """Every output (auxiliary layers and two-stage proposals included) of a batch of three, one
    of them padded, run in chunks: the same as the whole batch, and the chunks are the size
    asked for."""
    model = small_model("deformable", two_stage=True)
    images, mask = padded_batch()
    images, mask = torch.cat([images, images.flip(0)[:1]]), torch.cat([mask, mask.flip(0)[:1]])
    expected = run(model, images, mask)
    sizes = []
    model.backbone.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    monkeypatch.setattr(
        chunking, "CPU_PIXELS_PER_FORWARD", images_per_forward * images[0, 0].numel()
    )
    got = run(adopt(model, chunked(type(model))), images, mask)
    assert sizes == {1: [1, 1, 1], 2: [2, 1]}[images_per_forward]
    assert (
        got.keys() == expected.keys() == {"pred_logits", "pred_boxes", "aux_outputs", "enc_outputs"}
    )
    assert len(got["aux_outputs"]) == len(expected["aux_outputs"]) == 1
    pairs = [(got, expected), (got["enc_outputs"], expected["enc_outputs"])]
    pairs += zip(got["aux_outputs"], expected["aux_outputs"])
    for outputs, reference in pairs:
        for key in ("pred_logits", "pred_boxes"):
            assert outputs[key].shape[0] == 3
            # Matrix products over fewer rows may round differently: fp32's 1e-4, as above.
            torch.testing.assert_close(outputs[key], reference[key], atol=1e-4, rtol=0)


def test_chunks_are_sized_by_pixels_on_a_cpu_only():
    images = torch.zeros(4, 3, 10, 10)  # 100 pixels each
    assert images_per_chunk(100, images) == 1
    assert images_per_chunk(50, images) == 1  # at least one image
    assert images_per_chunk(250, images) == 2
    assert images_per_chunk(400, images) is None  # the whole batch fits
    assert images_per_chunk(None, images) is None
    assert images_per_chunk(100, images.to("meta")) is None
    model = small_model("detr")
    assert isinstance(optimize_for_inference(model), ChunkedBatches)
    # Compiled models run batches whole: chunks would be unrolled into the graph.
    compiled = optimize_for_inference(model, compile=True)._orig_mod
    assert isinstance(compiled, detrkit.models.DETR)
    assert not isinstance(compiled, ChunkedBatches)
    with pytest.raises(ValueError, match="images_per_chunk"):
        forward_in_chunks(lambda *_: {}, images, None, 0)


@pytest.mark.parametrize(("precision", "expected"), [("fp32", [1, 1, 1]), ("bf16", [2, 1])])
def test_chunks_hold_the_same_bytes_in_each_precision(precision, expected, monkeypatch):
    """A budget of one fp32 image's pixels: one image per forward in fp32, two in bf16, whose
    activations take half the bytes."""
    images, mask = padded_batch()
    images, mask = torch.cat([images, images[:1]]), torch.cat([mask, mask[:1]])
    monkeypatch.setattr(chunking, "CPU_PIXELS_PER_FORWARD", images[0, 0].numel())
    optimized = optimize_for_inference(small_model("detr"), precision)
    sizes = []
    optimized.backbone.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    got = run(optimized, images, mask)
    assert sizes == expected
    assert got["pred_boxes"].shape[0] == 3


def test_two_stage_runs_in_bf16():
    # The encoder's proposals are ranked by score, and near ties of a random model rank
    # differently in bf16: only that it runs and gives finite boxes is checked here.
    model = small_model("deformable", two_stage=True)
    images, mask = padded_batch()
    got = run(optimize_for_inference(model, "bf16"), images, mask)
    assert got["pred_boxes"].float().isfinite().all()


def test_the_model_passed_in_is_untouched(models):
    model = models["detr"]
    images, mask = padded_batch()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    expected = run(model, images, mask)["pred_logits"]
    for precision in ("fp32", "bf16"):
        optimize_for_inference(model, precision)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(
        value.dtype == torch.float32 for value in after.values() if value.is_floating_point()
    )
    assert (
        not model.backbone[0].body["conv1"].weight.is_contiguous(memory_format=torch.channels_last)
    )
    assert torch.equal(run(model, images, mask)["pred_logits"], expected)


def test_trainable_batch_norm_folds_in_eval_mode():
    # The digits presets train their ResNet-18's batch norm (nn.BatchNorm2d).
    torch.manual_seed(0)
    model = randomise_norms_and_heads(detrkit.build_model("detr_digits").eval())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    images, mask = padded_batch()
    optimized = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    torch.testing.assert_close(
        run(optimized, images, mask)["pred_logits"],
        run(model, images, mask)["pred_logits"],
        atol=1e-4,
        rtol=0,
    )
    # In train mode a batch norm normalises with the batch's statistics: it cannot fold.
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(model.train())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms


def test_bad_precisions_are_refused(models):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'int8'"):
        optimize_for_inference(models["detr"], "int8")
    with pytest.raises(ValueError, match="precision='fp16' needs a GPU"):
        optimize_for_inference(models["detr"], "fp16")


def image(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=generator)


def test_detector_precision(models):
    model = models["deformable"]
    plain = Detector(model, threshold=0.0, size=None, device="cpu")
    fast = Detector(model, threshold=0.0, size=None, device="cpu", precision="fp32")
    assert plain.model is model and fast.model is not model
    for expected, got in zip(plain([image(0), image(1)]), fast([image(0), image(1)])):
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-2, rtol=0)  # pixels
    low = Detector(model, threshold=0.0, size=None, device="cpu", precision="bf16")(image(0))
    assert low.boxes.dtype == torch.float32 and low.boxes.isfinite().all()
    with pytest.raises(ValueError, match="precision='fp16' needs a GPU"):
        Detector(model, device="cpu", precision="fp16")


def test_predict_and_eval_take_a_precision(tmp_path, capsys):
    torch.manual_seed(0)
    weights = detrkit.save(detrkit.build_model("detr_digits"), tmp_path / "model")
    image_dir = tmp_path / "in"
    image_dir.mkdir()
    from PIL import Image

    Image.fromarray(image(0).permute(1, 2, 0).numpy()).save(image_dir / "1.png")
    predict = ["predict", "--weights", str(weights), str(image_dir), "--threshold", "0"]
    predict += ["--short-side", "64"]
    assert main([*predict, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "detections.json").read_text())
    assert main([*predict, "--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 2
    assert "precision='fp16' needs a GPU" in capsys.readouterr().err

    evaluate = ["eval", "--weights", str(weights), "--data", "digits", "--digits-val", "2"]
    evaluate += ["--image-scale", "0.12"]
    numbers = {}
    for precision in ("reference", "fp32"):
        options = [] if precision == "reference" else ["--precision", precision]
        assert main([*evaluate, *options, "--out", str(tmp_path / precision)]) == 0
        numbers[precision] = json.loads((tmp_path / precision / "metrics.json").read_text())
    assert numbers["fp32"] == pytest.approx(numbers["reference"], abs=1e-3)
    assert main([*evaluate, "--precision", "bf16", "--amp", "bf16"]) == 2
    assert "choose one of amp ('bf16') and precision ('bf16')" in capsys.readouterr().err


def test_bottlenecks_add_their_last_convolution_into_the_shortcut_in_place():
    """optimize_for_inference's residual addition: conv3's product accumulates into the
    shortcut's memory (the block's input when there is no downsampling), with the same result as
    the block's usual forward; with gradients on, or maps not channels-last, the usual forward."""
    torch.manual_seed(0)
    # 32 -> 8 -> 8 -> 32 channels, no downsampling
    block = adopt(Bottleneck(32, 8), FastBottleneck).eval()
    with torch.no_grad():
        for norm in (block.bn1, block.bn2, block.bn3):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 1.5)
        fold_into_conv(block.conv3, block.bn3)
        block.bn3 = nn.Identity()
    block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 9, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x.clone())
        block = adopt(block, AccumulatingBottleneck)
        assert can_accumulate_pointwise(
            block.conv3, torch.randn(2, 8, 9, 7).to(memory_format=torch.channels_last), x
        )
        inputs = x.clone()
        got = block(inputs)
        assert got.data_ptr() == inputs.data_ptr()  # the input's memory holds the output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # A hook on conv3 must run: the usual forward, the input left as it was.
        handle = block.conv3.register_forward_hook(lambda *args: None)
        inputs = x.clone()
        torch.testing.assert_close(block(inputs), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(inputs, x)
        handle.remove()
        # Not channels-last: the usual forward, and the input is left as it was.
        plain = x.contiguous()
        torch.testing.assert_close(block(plain), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain, x)
    # With gradients on, the usual forward: autograd needs the input as it was.
    inputs = x.clone().requires_grad_(True)
    block(inputs).sum().backward()
    assert inputs.grad is not None
    torch.testing.assert_close(inputs.detach(), x)

    accumulator = torch.randn(1, 4, 3, 5).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(6, 4, 1).to(memory_format=torch.channels_last)
    source = torch.randn(1, 6, 3, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = accumulator + conv(source)
        torch.testing.assert_close(accumulate_pointwise(conv, source, accumulator), expected)
    assert not can_accumulate_pointwise(nn.Conv2d(6, 4, 1, stride=2), source, accumulator)
    assert not can_accumulate_pointwise(nn.Conv2d(6, 4, 3), source, accumulator)


def test_optimize_for_inference_sets_the_in_place_residuals_of_folded_blocks(models):
    optimized = optimize_for_inference(models["detr"])
    blocks = [m for m in optimized.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(isinstance(block, AccumulatingBottleneck) for block in blocks)
    unfolded = optimize_for_inference(models["detr"], fold_batchnorm=False)
    blocks = [m for m in unfolded.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    assert not any(isinstance(block, AccumulatingBottleneck) for block in blocks)


@pytest.mark.parametrize("name", ["detr_r50", "deformable_detr_two_stage"])
def test_off_a_cpu_the_forward_reads_no_values_and_skips_the_cpu_workarounds(name):
    """On a GPU, every read of a tensor's values (``.item()``, ``bool()``, ``.cpu()``) makes
    the host wait for the queued work. Meta tensors have no values, so any read fails: a whole
    forward on them shows that inference reads none. The device also stands in for a GPU in
    what optimize_for_inference chooses: none of its CPU-only steps."""
    from detrkit.ops.winograd import WinogradConv2d

    with torch.device("meta"):
        model = detrkit.build_model(name, num_queries=20, **SMALL).eval()
    for precision in ("fp32", "bf16"):
        optimized = optimize_for_inference(model, precision)
        modules = list(optimized.modules())
        assert not isinstance(optimized, ChunkedBatches)
        cpu_only = (WinogradConv2d, AccumulatingBottleneck, ChunkedDeformableEncoderLayer)
        assert not any(isinstance(m, cpu_only) for m in modules)
        images = torch.empty(2, 3, 96, 128, device="meta")
        mask = torch.zeros(2, 96, 128, device="meta", dtype=torch.bool)
        # The fused kernels need a real device, and the reference reads the level sizes to
        # split value by level; the portable operator keeps them as tensors.
        with torch.no_grad(), attention_implementation("portable"):
            outputs = optimized(images, mask)
        assert outputs["pred_boxes"].shape == (2, optimized.config.num_queries, 4)

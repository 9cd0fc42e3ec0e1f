"""What several test modules share: small models and inputs, generated data files, markers and the
shared reference directory. Tests import from here (``from helpers import ...``), never from
conftest.py (fixtures and pytest hooks only) or from each other.

The fused CPU kernels (``needs_fused``): a test that needs them fails when they cannot be built,
unless ``DETRKIT_ALLOW_NO_KERNELS=1`` is set (for a machine without a C++ compiler; CI never sets
it), which makes those tests skip instead. test_extension_build.py shows the compiler's log.

Kept light to import: tests/triton_interpreter_check.py runs it in a subprocess before Triton's
kernels are defined, so detrkit's modules are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- The official parameter layouts -------------------------------------------------------------

# `name (shape)` per line, in state-dict order, of the official models with 91 COCO classes, as
# the original repositories' checkpoints hold them. Read from the project's shared directory next
# to the checkout (CI has it); there is no copy in the repository.
SHARED_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


def shared_reference_file(name: str) -> Path:
    """``SHARED_REFERENCE_DIR / name``; fails the test, saying what is missing, when it is not
    there."""
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.fail(
            f"the shared reference directory {SHARED_REFERENCE_DIR} is missing: the official "
            "parameter layouts (*.keys) are read from ../shared/reference next to the repository "
            "root, and a checkout without it cannot check them",
            pytrace=False,
        )
    path = SHARED_REFERENCE_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} is missing from the shared reference directory", pytrace=False)
    return path


# --- Markers --------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs the export extra (onnx, onnxruntime, onnxscript)",
)

# Set to 1 to skip, instead of fail, the tests of the fused CPU kernels where they cannot be built.
ALLOW_NO_KERNELS = "DETRKIT_ALLOW_NO_KERNELS"

# A test (or a pytest.param) that runs the fused CPU kernels: conftest.py's pytest_runtest_setup
# calls require_fused_kernels() before it.
needs_fused = pytest.mark.fused_kernels


def kernels_may_be_missing() -> bool:
    return os.environ.get(ALLOW_NO_KERNELS) == "1"


def fused_kernel_build_log() -> str:
    """What a fresh build of the fused CPU kernels prints, the compiler's log included: where
    they failed to build, load_extension kept only the first line of the error, and
    cpp_extension does not try a failed build again within a process, so a new interpreter
    builds them."""
    build = "from detrkit.ops import _extension; _extension._build()"
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True)
    if result.returncode == 0:
        return f"(a fresh build succeeded; it printed:)\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def require_fused_kernels() -> None:
    """Fails the calling test when the fused CPU kernels cannot be built (skips it under
    DETRKIT_ALLOW_NO_KERNELS=1)."""
    from detrkit.ops import fused_kernel_available

    if fused_kernel_available():
        return
    reason = (
        "the fused CPU kernels could not be built (tests/test_extension_build.py::"
        "test_the_fused_cpu_kernels_build shows the compiler's log)"
    )
    if kernels_may_be_missing():
        pytest.skip(f"{reason}; {ALLOW_NO_KERNELS}=1")
    pytest.fail(
        f"{reason}; set {ALLOW_NO_KERNELS}=1 to skip the tests that need them", pytrace=False
    )


# --- Small models and inputs ------------------------------------------------------------------

# A model small enough to train a few steps in seconds: every module of the real one is there.
TINY_MODEL = {
    "hidden_dim": 64,
    "nheads": 2,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "num_queries": 8,
    "num_feature_levels": 2,
}


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two differently sized random images padded into one batch (the second has padding)."""
    from detrkit import pad_images

    generator = torch.Generator().manual_seed(seed)
    images = [
        torch.randn(3, 128, 160, generator=generator),
        torch.randn(3, 96, 120, generator=generator),
    ]
    return pad_images(images)


def frozen_norm(channels: int, generator: torch.Generator) -> nn.Module:
    """A frozen batch norm with non-trivial statistics (a fresh one is the identity)."""
    from torchvision.ops import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(channels)
    norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=generator))
    norm.running_mean.copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    return norm


def small_detr(**overrides):
    """A DETR-R50 with a small transformer: fast, but every kind of module is present."""
    from detrkit import build_model

    options = dict(enc_layers=2, dec_layers=3, num_queries=12, num_classes=7, dim_feedforward=64)
    options.update(overrides)
    torch.manual_seed(0)
    return build_model("detr_r50", **options)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Weights far from transformers' near-identity init, so that every difference shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "running_var" in name:
                t.uniform_(0.5, 2.0, generator=generator)
            elif "running_mean" in name or ("backbone" in name and t.dim() == 1):
                t.normal_(0, 0.1, generator=generator)
            elif "backbone" in name:
                continue
            elif t.dim() > 1:
                nn.init.xavier_uniform_(t, generator=generator)
            else:
                t.normal_(0, 0.2, generator=generator)


# The models that the export tests export (test_export.py, test_export_faults.py).
EXPORT_TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, num_queries=5)
EXPORT_TINY.update(dim_feedforward=32, num_classes=3, dropout=0.0)
EXPORT_MODELS = {
    "detr": ("detr_r50", dict(dec_layers=1)),
    # four levels: C3-C5 and the extra stride-2 level, each with its own padding mask
    "deformable": ("deformable_detr", dict(dec_layers=2, backbone_norm="batch")),
    "deformable_refine": ("deformable_detr_refine", dict(dec_layers=2, num_feature_levels=2)),
    "deformable_two_stage": (
        "deformable_detr_two_stage",
        dict(dec_layers=2, num_feature_levels=2, backbone_norm="batch"),
    ),
}


def tiny_model(name: str, **options) -> torch.nn.Module:
    """A small random model whose every weight and batch-norm statistic matters to its output
    (the original initialisation zeroes the box heads' last layers); ``options`` change its
    config."""
    import detrkit

    preset, overrides = EXPORT_MODELS[name]
    torch.manual_seed(0)
    model = detrkit.build_model(preset, **{**EXPORT_TINY, **overrides, **options}).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def tiny_panoptic_model() -> torch.nn.Module:
    """A small random DETRSegmentation (the mask head needs hidden_dim a multiple of 128), every
    weight perturbed as tiny_model perturbs them."""
    import detrkit

    torch.manual_seed(0)
    model = detrkit.build_model(
        "detr_r50_panoptic",
        backbone="resnet18",
        hidden_dim=128,
        nheads=8,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=64,
        num_queries=5,
        num_classes=3,
        dropout=0.0,
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


# --- Multi-scale deformable attention's inputs (test_ms_deform_attn.py and
# triton_interpreter_check.py) ----------------------------------------------------------------

FOUR_LEVELS = [(7, 9), (4, 5), (2, 3), (1, 2)]  # unequal, non-square


def make_inputs(
    spatial_shapes: list[tuple[int, int]],
    batch: int = 2,
    heads: int = 8,
    channels: int = 5,
    queries: int = 6,
    points: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random inputs; locations fall in [-0.2, 1.2] so that some corners are off the map, and
    the attention weights are not normalised."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    level_start_index = areas.cumsum(0) - areas
    levels = len(spatial_shapes)
    value = torch.randn(batch, int(areas.sum()), heads, channels, generator=generator)
    sampling_locations = (
        torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * 1.4 - 0.2
    )
    attention_weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    return (
        value.to(dtype),
        shapes,
        level_start_index,
        sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )


def assert_close_fp32(actual: Tensor, expected: Tensor, name: str, rtol: float = 1e-5) -> None:
    """rtol 1e-5, and atol 1e-6 in units of the tensor's largest magnitude.

    A per-element atol in absolute units would be dishonest for the gradients: sums of D products
    that cancel keep an fp32 rounding residue proportional to the terms, not to the small result
    (e.g. grad_sampling_locations of scale ~150 differ by ~2e-5 between two fp32 orders of
    summation, and both are that far from a float64 computation).
    """
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}"
    )


# The names of the output and the three gradients that the attention tests compare, in order.
ATTENTION_RESULTS = ["output", "grad_value", "grad_sampling_locations", "grad_attention_weights"]

ATTENTION_CASES = {
    # The CPU kernel's channel blocks (16 lanes): D = 5, scalar channels only; 32, one block of
    # two vectors; 45 = 32 + 13; 83 = 64 (four vectors) + 16 + 3. Its points go 16 at a time:
    # 3, 12 and 20 points per head leave part of a vector.
    "one_level": dict(spatial_shapes=[(6, 11)], channels=5),
    "four_levels": dict(spatial_shapes=FOUR_LEVELS, channels=32),
    "four_levels_odd_channels": dict(spatial_shapes=FOUR_LEVELS, channels=45, heads=3),
    "many_points_wide_channels": dict(spatial_shapes=FOUR_LEVELS, channels=83, heads=2, points=5),
}


def set_input(index: int, replacement):
    """Replaces the index-th input of ms_deform_attn; replacement maps the original tensor to a
    new one."""

    def apply(inputs):
        inputs = list(inputs)
        inputs[index] = replacement(inputs[index])
        return inputs

    return apply


VALUE, SHAPES, STARTS, LOCATIONS, WEIGHTS = range(5)
# Each way of getting one input of ms_deform_attn wrong: (corruption, the input's name).
BAD_INPUTS = {
    "value_rank": (set_input(VALUE, lambda t: t.flatten(2)), "value"),
    "value_integer": (set_input(VALUE, lambda t: t.long()), "value"),
    "shapes_dtype": (set_input(SHAPES, lambda t: t.int()), "spatial_shapes"),
    "shapes_columns": (set_input(SHAPES, lambda t: t[:, :1]), "spatial_shapes"),
    "shapes_sum": (set_input(SHAPES, lambda t: t + 1), "spatial_shapes"),
    "starts_dtype": (set_input(STARTS, lambda t: t.int()), "level_start_index"),
    "starts_length": (set_input(STARTS, lambda t: t[:-1]), "level_start_index"),
    "starts_values": (set_input(STARTS, lambda t: t + 1), "level_start_index"),
    "locations_rank": (set_input(LOCATIONS, lambda t: t[..., 0]), "sampling_locations"),
    "locations_batch": (set_input(LOCATIONS, lambda t: t[:1]), "sampling_locations"),
    "locations_heads": (set_input(LOCATIONS, lambda t: t[:, :, :2]), "sampling_locations"),
    "locations_levels": (set_input(LOCATIONS, lambda t: t[:, :, :, :2]), "sampling_locations"),
    "locations_xy": (set_input(LOCATIONS, lambda t: t[..., :1]), "sampling_locations"),
    "locations_dtype": (set_input(LOCATIONS, lambda t: t.double()), "sampling_locations"),
    "weights_points": (set_input(WEIGHTS, lambda t: t[..., :1]), "attention_weights"),
    "weights_queries": (set_input(WEIGHTS, lambda t: t[:, :2]), "attention_weights"),
    "weights_dtype": (set_input(WEIGHTS, lambda t: t.half()), "attention_weights"),
}


# --- Files: training data, command lines, official checkpoints ---------------------------------


def write_square_coco(directory: Path, count: int = 4, size: int = 64) -> tuple[Path, Path]:
    """Same-sized images (so that batches need no padding) with one box each."""
    rng = np.random.default_rng(0)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, count + 1):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            images_dir / f"{i}.png"
        )
        images.append({"id": i, "file_name": f"{i}.png", "height": size, "width": size})
        x, y = rng.integers(0, size // 2, 2).tolist()
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1 + i % 2,
                "bbox": [x, y, 20, 24],
                "area": 480,
                "iscrowd": 0,
            }
        )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    annotations_json = directory / "instances.json"
    annotations_json.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return images_dir, annotations_json


def tiny_args(output: Path, *extra: str) -> list[str]:
    """`detrkit train` arguments for a TINY_MODEL run of two epochs on a few built-in digits."""
    options = [f"--model-option={k}={v}" for k, v in TINY_MODEL.items()]
    return [
        "train",
        "--model",
        "deformable_detr_digits",
        "--data",
        "digits",
        "--output",
        str(output),
        "--digits-train",
        "8",
        "--digits-val",
        "4",
        "--batch-size",
        "2",
        "--image-scale",
        "0.12",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--epochs",
        "2",
        "--deterministic",
        # Eight images in up to ten aspect groups would make mostly batches of one; the tests
        # count steps of the plain batching, and pass --group-by-aspect where they test it.
        "--no-group-by-aspect",
        *options,
        *extra,
    ]


def official_args(**values) -> argparse.Namespace:
    """The training arguments the original main.py stores (the fields detrkit reads, and others)."""
    defaults = dict(
        lr=1e-4,
        lr_backbone=1e-5,
        batch_size=2,
        epochs=300,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=2048,
        hidden_dim=256,
        dropout=0.1,
        nheads=8,
        num_queries=100,
        pre_norm=False,
        masks=False,
        aux_loss=True,
        dataset_file="coco",
        output_dir="",
        device="cuda",
        seed=42,
    )
    defaults.update(values)
    return argparse.Namespace(**defaults)


def write_official(model, path, args=None, bare=False):
    """Writes a checkpoint with the structure of the DETR authors' published files."""
    if bare:
        torch.save(model.state_dict(), path)
        return path
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 200)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 299,
            "args": args,
        },
        path,
    )
    return path

"""Training-step time of detrkit against Hugging Face transformers' own training step.

    python benchmarks/train_step.py [--models detr deformable_detr] [--repeats 5]
                                    [--size 512 640] [--batch 2] [--objects 5] [--profile N]
                                    [--device cpu] [--keep-freed-memory] [--amp bf16]
                                    [--no-channels-last]

One step is forward, loss (Hungarian matching and the set loss of the final and every auxiliary
decoder layer), backward, gradient clipping at max norm 0.1 and an AdamW step. transformers' step
is its model called with ``labels``; detrkit's is what ``detrkit train`` runs: the model,
``build_criterion`` and ``build_optimizer``. Both start from the same randomly initialised weights
(written by save_pretrained, read by detrkit.load) and see the same batch. transformers trains
its whole ResNet, while detrkit, like the original, keeps the stem and layer1 fixed: a second
transformers row with those frozen too compares like with like.

Before timing, the final layer's loss terms of both on that batch, dropout off, are printed side
by side: equal terms show that the two steps do the same work. (Deformable DETR's totals differ:
transformers weighs its classification loss 1, the original 2.) Then every step is timed in
interleaved rounds (a change of load on a shared machine falls on all), median and shortest, as
a ratio of transformers'. With ``--profile N``, the N operators with the most self CPU time in
one more step of detrkit and of transformers (stem and layer1 frozen) are printed. With
``--device cuda`` everything runs on the GPU, Deformable DETR's attention on the Triton kernels.
``--keep-freed-memory`` runs it all with malloc keeping freed memory, as ``detrkit train`` does.
detrkit's model has its convolution weights in channels-last memory, as ``detrkit train`` does by
default (``TrainConfig.channels_last``); ``--no-channels-last`` keeps the usual layout.
``--amp bf16`` (or ``fp16`` on a GPU) runs every model's forward under ``torch.autocast``, as
``detrkit train --amp`` does (detrkit's loss outside it, as in its engine; transformers computes
its loss inside its forward); the ratios are then to transformers' step under the same autocast.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from end_to_end import (
    add_keep_freed_memory_option,
    apply_keep_freed_memory_option,
    print_profile,
    synchronize,
)

import detrkit
from detrkit.engine.config import TrainConfig
from detrkit.engine.evaluate import AUTOCAST_DTYPES
from detrkit.engine.optim import build_optimizer
from detrkit.fast import optimize_for_training
from detrkit.loss import build_criterion

CLIP_MAX_NORM = 0.1


def hf_training_model(name: str):
    """A randomly initialised transformers model with auxiliary losses, as trained originally."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if name == "detr":
        return transformers.DetrForObjectDetection(transformers.DetrConfig(auxiliary_loss=True))
    config = transformers.DeformableDetrConfig(auxiliary_loss=True)
    return transformers.DeformableDetrForObjectDetection(config)


def make_batch(
    batch: int, size: list[int], objects: int, num_classes: int, device: torch.device, seed: int = 0
):
    """Random images and ``objects`` random boxes per image (normalised cx, cy, w, h)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=generator)
    mask = torch.zeros(batch, *size, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        centres = 0.2 + 0.6 * torch.rand(objects, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(objects, 2, generator=generator)
        labels = torch.randint(num_classes, (objects,), generator=generator)
        boxes = torch.cat([centres, sizes], dim=1)
        targets.append({"labels": labels.to(device), "boxes": boxes.to(device)})
    return images.to(device), mask.to(device), targets


def hf_step(model, optimizer, images, mask, targets, autocast):
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with autocast():
        outputs = model(pixel_values=images, pixel_mask=(~mask).long(), labels=labels)
    optimizer.zero_grad(set_to_none=True)
    outputs.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
    optimizer.step()
    return outputs


def detrkit_step(model, criterion, optimizer, images, mask, targets, autocast):
    with autocast():
        outputs = model(images, mask)
    losses = criterion(outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
    optimizer.step()
    return losses


def compare_losses(hf, ours, criterion, images, mask, targets) -> None:
    """Final-layer and total losses of both, dropout off, no update."""
    hf.eval()
    ours.eval()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        theirs = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=labels)
        mine = criterion(ours(images, mask), targets)
    print("  losses, dropout off:          transformers    detrkit")
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        print(f"    {name:28s} {theirs.loss_dict[name].item():12.5f} {mine[name].item():10.5f}")
    print(f"    {'weighted total':28s} {theirs.loss.item():12.5f} {mine['loss'].item():10.5f}")
    hf.train()
    ours.train()


def compare(name: str, args) -> None:
    device = torch.device(args.device)
    hf = hf_training_model(name)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = detrkit.load(directory, map_location=device)
    hf.to(device)
    # What `detrkit train` runs: the fast modules on the same parameters. ("auto" attention is
    # the Triton kernels on a GPU.)
    ours = optimize_for_training(ours)
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
    criterion = build_criterion(ours.config).to(device)
    images, mask, targets = make_batch(
        args.batch, args.size, args.objects, ours.config.num_classes, device
    )
    trainable = {
        "transformers": sum(p.numel() for p in hf.parameters() if p.requires_grad),
        "detrkit": sum(p.numel() for p in ours.parameters() if p.requires_grad),
    }
    print(
        f"\n{name}: batch {args.batch} at {args.size[0]}x{args.size[1]}, {args.objects} objects "
        f"per image; trainable parameters: transformers {trainable['transformers']:,}, "
        f"detrkit {trainable['detrkit']:,}"
    )
    compare_losses(hf, ours, criterion, images, mask, targets)

    lr, lr_backbone = (1e-4, 1e-5) if name == "detr" else (2e-4, 2e-5)
    hf_optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in hf.named_parameters() if "backbone" not in n]},
            {
                "params": [p for n, p in hf.named_parameters() if "backbone" in n],
                "lr": lr_backbone,
            },
        ],
        lr=lr,
        weight_decay=1e-4,
    )
    multiplier = 1.0 if name == "detr" else 0.1
    our_optimizer = build_optimizer(ours, lr, lr_backbone, 1e-4, multiplier)
    # transformers trains its whole ResNet; the original recipe (and detrkit) keeps the stem and
    # layer1 fixed. A second transformers model with those frozen shows what that alone is worth.
    hf_frozen = hf_training_model(name).to(device)
    hf_frozen.load_state_dict(hf.state_dict())
    for param_name, param in hf_frozen.named_parameters():
        if "backbone" in param_name and not any(f"layer{i}." in param_name for i in (2, 3, 4)):
            param.requires_grad_(False)
    hf_frozen.train()
    frozen_optimizer = torch.optim.AdamW(
        [p for p in hf_frozen.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4
    )
    amp_dtype = AUTOCAST_DTYPES[args.amp]

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    steps = {
        "transformers": lambda: hf_step(hf, hf_optimizer, images, mask, targets, autocast),
        "transformers, stem+layer1 frozen": lambda: hf_step(
            hf_frozen, frozen_optimizer, images, mask, targets, autocast
        ),
        "detrkit": lambda: detrkit_step(
            ours, criterion, our_optimizer, images, mask, targets, autocast
        ),
    }
    for step in steps.values():  # warm-up: allocations and optimiser state
        step()
    times = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    amp = "" if amp_dtype is None else f", {args.amp} autocast"
    print(f"  training step{amp}, {args.repeats} interleaved rounds after a warm-up: median (min)")
    reference = times["transformers"]
    for key, found in times.items():
        median, best = statistics.median(found), min(found)
        print(
            f"    {key:34s} {median:8.3f} s ({best:6.3f} s) "
            f"{median / statistics.median(reference):6.2f}x ({best / min(reference):4.2f}x)"
        )
    if args.profile:
        for key in ("detrkit", "transformers, stem+layer1 frozen"):
            print_profile(key, steps[key], args.profile, inference=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=[512, 640], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=5, help="target boxes per image")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N operators of a step"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--amp", default="none", choices=list(AUTOCAST_DTYPES), help="autocast of the forwards"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=TrainConfig.channels_last,
        help="detrkit's convolution weights channels-last, as detrkit train stores them",
    )
    add_keep_freed_memory_option(parser)
    args = parser.parse_args()
    apply_keep_freed_memory_option(parser, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    for name in args.models:
        compare(name, args)


if __name__ == "__main__":
    main()

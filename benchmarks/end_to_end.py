"""End-to-end latency of detrkit against Hugging Face transformers on the same weights and input.

    python benchmarks/end_to_end.py [--models detr deformable_detr] [--repeats 5] [--size 800 1066]

For each model a randomly initialised transformers model is saved with save_pretrained and loaded
with detrkit.load (so both run the very same weights); both then run the same normalised image,
batch 1, fp32, in inference mode. Prints the median time of each and detrkit's time as a fraction
of transformers', and checks that the outputs agree.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import detrkit


def hf_model(name: str):
    import transformers

    if name == "detr":
        config = transformers.DetrConfig(auxiliary_loss=False)
        return transformers.DetrForObjectDetection(config).eval()
    config = transformers.DeformableDetrConfig()
    return transformers.DeformableDetrForObjectDetection(config).eval()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, one-time kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(1, 3, *args.size)
    mask = torch.zeros(1, *args.size, dtype=torch.bool)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(images.shape)}"
    )
    print(f"{'model':16s} {'transformers':>13s} {'detrkit':>9s} {'ratio':>7s} {'max |diff|':>11s}")
    for name in args.models:
        compare(name, images, mask, args.repeats)


def compare(name: str, images: torch.Tensor, mask: torch.Tensor, repeats: int) -> None:
    """Times one model in both libraries and prints a row of the table."""
    hf = hf_model(name)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = detrkit.load(directory)
    pixel_mask = (~mask).long()
    with torch.inference_mode():
        diff = (
            hf(pixel_values=images, pixel_mask=pixel_mask).logits
            - ours(images, mask)["pred_logits"]
        )
        hf_time = median_time(lambda: hf(pixel_values=images, pixel_mask=pixel_mask), repeats)
        our_time = median_time(lambda: ours(images, mask), repeats)
    ratio = our_time / hf_time
    print(f"{name:16s} {hf_time:12.3f}s {our_time:8.3f}s {ratio:6.2f}x {diff.abs().max():11.1e}")


if __name__ == "__main__":
    main()

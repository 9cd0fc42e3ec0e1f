"""Size and load time of ``detrkit explore``'s page for full-size models on an 800x1066 image.

    python benchmarks/explore_page.py [--models detr_r50 deformable_detr_two_stage]
                                      [--image IMG] [--repeats 5]

Each model (random weights: no download) runs once on the image (default: a smooth random
800x1066 picture), the page is written, then opened from disk in Debian's Chromium (headless,
driven by Playwright, the network blocked) ``--repeats`` times. Prints per model: the time to
run and write the page, its size, and the median time from navigation until the page has unpacked
its data and drawn every view, then the time to switch the selection to another query and to a
pixel. No other implementation writes such a page, so there is no peer to compare with.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import detrkit
from detrkit.inference import Detector
from detrkit.inference.explore import explore

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def smooth_image(height: int = 800, width: int = 1066) -> torch.Tensor:
    """Random colour blobs (JPEG-compressible, like a photo) as uint8 ``[3, H, W]``."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, height // 40, width // 40, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8)


def measure_page(browser, path: Path, repeats: int) -> dict[str, float]:
    loads, query_switches, pixel_clicks = [], [], []
    for _ in range(repeats):
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.route(
            "**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort()
        )
        start = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready]", state="attached", timeout=120_000)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        page.fill("#query", "7")
        page.dispatch_event("#query", "change")
        page.evaluate("document.getElementById('selection').textContent")
        query_switches.append(time.perf_counter() - start)
        box = page.locator("#image-svg").bounding_box()
        start = time.perf_counter()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.evaluate("document.getElementById('selection').textContent")
        pixel_clicks.append(time.perf_counter() - start)
        page.close()
    return {
        "load": statistics.median(loads),
        "query": statistics.median(query_switches),
        "pixel": statistics.median(pixel_clicks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr_r50", "deformable_detr_two_stage"])
    parser.add_argument("--image", help="an image file (default: a random 800x1066 picture)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("needs Debian's Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    image = args.image if args.image else smooth_image()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        for name in args.models:
            torch.manual_seed(0)
            detector = Detector(detrkit.build_model(name), threshold=0.5, device="cpu")
            start = time.perf_counter()
            path, data = explore(detector, image, Path(tmp) / f"{name}.html", name)
            written = time.perf_counter() - start
            times = measure_page(browser, path, args.repeats)
            size = path.stat().st_size / 1e6
            rows.append((name, "x".join(map(str, data["input_size"])), written, size, times))
        browser.close()
    print(f"Chromium {chromium}; torch {torch.__version__}; {args.repeats} loads each (median)")
    print(
        f"{'model':28} {'input':>9} {'run+write':>9} {'page MB':>8} {'load':>7} {'query':>7} {'pixel':>7}"
    )
    for name, size_text, written, size, times in rows:
        print(
            f"{name:28} {size_text:>9} {written:8.1f}s {size:8.1f} {times['load']:6.2f}s "
            f"{times['query']:6.2f}s {times['pixel']:6.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

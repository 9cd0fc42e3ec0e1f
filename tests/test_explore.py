"""``detrkit explore``: the page, opened in a real browser (Debian's Chromium, driven by
Playwright, the network blocked), shows exactly what ``capture_internals`` recorded; and bad
input is refused before anything is written.

Chromium comes from the system (``apt-get install chromium``; .ci/run installs it); nothing is
downloaded. Without it these tests fail, saying so, unless ``DETRKIT_ALLOW_NO_BROWSER=1``.
Screenshots of every view go to build/screenshots/ (look at them).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import detrkit
from detrkit.cli.main import main
from detrkit.inference import Detector, capture_internals
from detrkit.inference.explain import to_image_pixels
from detrkit.inference.explore import ENCODER_QUERY_BUDGET, explore
from detrkit.inference.trace import record_flow, trace_model
from detrkit.models import PRESETS, DeformableDETRConfig, DETRSegmentationConfig
from helpers import REPO_ROOT, tiny_model

SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
HEIGHT, WIDTH = 96, 128
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    return os.environ.get("DETRKIT_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("DETRKIT_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no chromium (DETRKIT_ALLOW_NO_BROWSER=1)")
        pytest.fail(
            "the explore page is tested in Debian's Chromium: apt-get install chromium (or set "
            "DETRKIT_CHROMIUM to a Chromium binary; DETRKIT_ALLOW_NO_BROWSER=1 skips)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Page:
    """A page opened from disk, recording console errors and every request it makes."""

    def __init__(self, browser, path: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1500, "height": 1100})
        self.requests, self.errors = [], []

        def route(route):
            self.requests.append(route.request.url)
            if route.request.url.startswith("file://"):
                route.continue_()
            else:  # the network is blocked: nothing may leave the file
                route.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("body[data-ready]", state="attached", timeout=60_000)
        assert self.page.evaluate("document.body.dataset.ready") == "true", self.errors

    def check_clean(self, path: Path) -> None:
        assert self.errors == []
        assert self.requests == [path.as_uri()]

    def select_query(self, query: int) -> None:
        self.page.fill("#query", str(query))
        self.page.dispatch_event("#query", "change")

    def only_heads(self, *heads: int) -> None:
        for box in self.page.query_selector_all("#heads input"):
            wanted = int(box.get_attribute("data-head")) in heads
            if box.is_checked() != wanted:
                box.click()

    def read(self, selector: str) -> list[dict]:
        return self.page.eval_on_selector_all(
            selector, "els => els.map(e => Object.assign({}, e.dataset))"
        )

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

    def click_image_pixel(self, x: float, y: float) -> None:
        """A real mouse click on image pixel (x, y), the view zoomed out."""
        if self.page.is_checked("#zoom"):
            self.page.click("#zoom")
        box = self.page.locator("#image-svg").bounding_box()
        self.page.mouse.click(
            box["x"] + x / WIDTH * box["width"], box["y"] + y / HEIGHT * box["height"]
        )

    def close(self) -> None:
        self.context.close()


def image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator)


def page_and_internals(tmp_path, model, name):
    """Writes the page of ``model`` on the test image; returns its path, its data and what
    capture_internals records of the same pass."""
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    path, data = explore(detector, image(), tmp_path / f"{name}.html", name)
    with torch.no_grad(), capture_internals(detector.model) as internals:
        detector.detect([image()])
    return path, data, internals


def assert_samples(drawn, record, query, heads, levels, valid_ratios, tolerance_px, weight_tol):
    """The drawn sampling points are the record's, for these heads and levels, to a pixel."""
    expected = {}
    for head in heads:
        for level in levels:
            for point in range(record.sampling_locations.shape[4]):
                location = record.sampling_locations[0, query, head, level, point]
                x, y = to_image_pixels(location, valid_ratios[0, level], (HEIGHT, WIDTH)).tolist()
                weight = float(record.attention_weights[0, query, head, level, point])
                expected[(head, level, point)] = (x, y, weight)
    got = {(int(d["head"]), int(d["level"]), int(d["point"])): d for d in drawn}
    assert set(got) == set(expected)
    for key, (x, y, weight) in expected.items():
        assert abs(float(got[key]["x"]) - x) < tolerance_px, key
        assert abs(float(got[key]["y"]) - y) < tolerance_px, key
        assert abs(float(got[key]["weight"]) - weight) <= weight_tol, key


def screen_positions_match(page: Page) -> None:
    """Each drawn circle (head 1's marker) sits on screen where its image pixel is shown."""
    mismatches = page.page.evaluate(
        """() => {
        const svg = document.getElementById("image-svg"), ctm = svg.getScreenCTM();
        const bad = [];
        for (const e of document.querySelectorAll('.sample[data-head="0"]')) {
            const p = svg.createSVGPoint(); p.x = +e.dataset.x; p.y = +e.dataset.y;
            const s = p.matrixTransform(ctm), r = e.getBoundingClientRect();
            const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
            if (Math.abs(cx - s.x) > 1 || Math.abs(cy - s.y) > 1) bad.push([cx, cy, s.x, s.y]);
        }
        return bad;
    }"""
    )
    assert mismatches == []


@pytest.mark.parametrize("name", ["deformable", "deformable_refine", "deformable_two_stage"])
def test_deformable_page_draws_the_captured_sampling_points(browser, tmp_path, name):
    model = tiny_model(name, nheads=4, enc_layers=2)
    path, data, internals = page_and_internals(tmp_path, model, name)
    ratios = internals.valid_ratios
    page = Page(browser, path)
    try:
        page.check_clean(path)
        query = data["detections"][0]["query"]
        page.select_query(query)
        page.screenshot(f"explore_{name}_query")
        drawn = page.read(".sample")
        levels = range(model.config.num_feature_levels)
        last = internals.decoder_sampling[-1]
        assert_samples(drawn, last, query, range(4), levels, ratios, 1e-3, 1e-6)
        screen_positions_match(page)
        # Its box after every decoder layer, and the reference point of the layer shown.
        assert len(page.read(".layer-box")) == model.config.dec_layers
        reference = page.read('.reference[data-level="0"]')[0]
        centre = to_image_pixels(
            last.reference_points[0, query, 0, :2], ratios[0, 0], (HEIGHT, WIDTH)
        )
        assert [float(reference["x"]), float(reference["y"])] == pytest.approx(
            centre.tolist(), abs=1e-3
        )
        assert bool(page.read(".reference-box")) == (last.reference_points.shape[-1] == 4)

        # Layer 1, level 1, head 2 only: exactly those points; then head 3 and layer 2.
        page.page.select_option("#dec-layer", "0")
        page.page.select_option("#level", "1")
        page.only_heads(1)
        first = page.read(".sample")
        assert_samples(first, internals.decoder_sampling[0], query, [1], [1], ratios, 1e-3, 1e-6)
        page.only_heads(2)
        page.page.select_option("#dec-layer", "1")
        second = page.read(".sample")
        record = internals.decoder_sampling[1]
        assert_samples(second, record, query, [2], [1], ratios, 1e-3, 1e-6)
        assert [(d["x"], d["y"]) for d in first] != [(d["x"], d["y"]) for d in second]
        page.screenshot(f"explore_{name}_layer2_level1_head3")

        # A pixel: the encoder query of its level-0 cell, in encoder layer 1, every level.
        page.page.select_option("#level", "all")
        page.page.select_option("#enc-layer", "0")
        page.only_heads(0, 1, 2, 3)
        x, y = 70.0, 30.0
        page.click_image_pixel(x, y)
        rows, cols = internals.encoder_sampling[0].spatial_shapes[0].tolist()
        cell = math.floor(y / HEIGHT * rows) * cols + math.floor(x / WIDTH * cols)
        record = internals.encoder_sampling[0]
        # Quantised: uint16 steps of the locations' range, weights in steps of 1/255.
        span = float(record.sampling_locations.max() - record.sampling_locations.min())
        assert_samples(
            page.read(".sample"),
            record,
            cell,
            range(4),
            levels,
            ratios,
            span * WIDTH / 65535,
            0.5 / 255,
        )
        assert len(page.read(".pixel")) == 1
        page.screenshot(f"explore_{name}_pixel")
    finally:
        page.close()


def test_detr_page_shows_the_captured_attention(browser, tmp_path):
    model = tiny_model("detr", nheads=4, enc_layers=2, dec_layers=2)
    path, data, internals = page_and_internals(tmp_path, model, "detr")
    height, width = internals.feature_shape
    page = Page(browser, path)
    try:
        page.check_clean(path)
        query = data["detections"][1]["query"]
        page.select_query(query)
        page.page.select_option("#dec-layer", "0")
        page.only_heads(2)
        cells = page.read(".cell")
        assert len(cells) == height * width  # no padding: every cell is the image's
        weights = internals.decoder_cross_attention[0].weights[0, 2, query]  # [H*W]
        step = float(weights.max()) / 65535  # stored as uint16 steps of the row's maximum
        for cell in cells:
            expected = float(weights[int(cell["row"]) * width + int(cell["col"])])
            assert abs(float(cell["weight"]) - expected) <= step
        page.screenshot("explore_detr_query_layer1_head3")

        # Every head: their mean.
        page.page.click("#heads-all")
        every = internals.decoder_cross_attention[0].weights[0, :, query]  # [M, H*W]
        mean, step = every.mean(0), float(every.max()) / 65535
        for cell in page.read(".cell"):
            expected = float(mean[int(cell["row"]) * width + int(cell["col"])])
            assert abs(float(cell["weight"]) - expected) <= step + 1e-7

        # A pixel: its cell's encoder self-attention (heads averaged) in the layer chosen.
        page.page.select_option("#enc-layer", "1")
        x, y = 100.0, 20.0
        page.click_image_pixel(x, y)
        row, col = math.floor(y / HEIGHT * height), math.floor(x / WIDTH * width)
        attention = internals.encoder_attention[1].weights[0, :, row * width + col].mean(0)
        step = float(attention.max()) / 255
        for cell in page.read(".cell"):
            expected = float(attention[int(cell["row"]) * width + int(cell["col"])])
            assert abs(float(cell["weight"]) - expected) <= step / 2 + 1e-7
        page.screenshot("explore_detr_pixel")
    finally:
        page.close()


def test_the_network_view_shows_the_pass_that_ran(browser, tmp_path):
    model = tiny_model("deformable_two_stage", nheads=4, enc_layers=2)
    path, _, _ = page_and_internals(tmp_path, model, "graph")
    with torch.no_grad(), record_flow(model) as nodes:
        Detector(model, threshold=0.0, size=None, device="cpu").detect([image()])
    page = Page(browser, path)
    try:
        shown = page.read(".node")
        assert [n["key"] for n in shown] == [node.key for node in nodes]
        # Every edge is labelled with the shape its source had in this pass.
        by_key = {node.key: node for node in nodes}
        labels = page.page.eval_on_selector_all(
            "text.edge-label", "els => els.map(e => [e.dataset.from, e.textContent])"
        )
        assert labels
        for source, text in labels:
            calls = by_key[source].calls
            shapes = {"[" + ", ".join(map(str, c.shape)) + "]" for c in calls}
            assert set(text.split(" | ")) <= shapes

        # A node: its code line (the file's own line), shape, statistics of the layer chosen.
        page.page.select_option("#enc-layer", "1")
        page.page.click('g.node[data-key="encoder.attn.locations"]')
        panel = page.page.inner_text("#node-panel")
        node = by_key["encoder.attn.locations"]
        source_line = (
            (REPO_ROOT / "src" / node.code.path).read_text().splitlines()[node.code.number - 1]
        )
        assert f"{node.code.path}:{node.code.number}" in panel
        assert "reference_points + sampling_offsets / offset_normalizer" in source_line
        assert source_line.strip() in panel
        assert f"{node.calls[1].stats['mean']:.5f}" in panel
        page.page.click('g.node[data-key="spatial_shapes"]')
        assert str(by_key["spatial_shapes"].calls[0].values).replace(
            " ", ""
        ) in page.page.inner_text("#node-panel").replace(" ", "")
        page.page.locator("#graph-view").screenshot(path=_shot("explore_graph"))
    finally:
        page.close()


def _shot(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"


def test_a_full_size_two_stage_page_fits_and_opens(browser, tmp_path):
    """The issue's bound: a full-size two-stage Deformable DETR on an 800x1066 image gives a
    page of at most 20 MB."""
    torch.manual_seed(0)
    model = detrkit.build_model("deformable_detr_two_stage").eval()
    pixels = torch.randint(0, 256, (3, 800, 1066), dtype=torch.uint8)
    detector = Detector(model, threshold=0.5, device="cpu")  # 800 x 1066 stays as it is
    path, data = explore(detector, pixels, tmp_path / "full.html", "full size")
    assert data["input_size"] == [800, 1066]
    assert path.stat().st_size <= 20e6
    stored = data["deformable"]["encoder"]["queries"]["shape"][0]
    assert stored <= ENCODER_QUERY_BUDGET
    page = Page(browser, path)
    try:
        page.check_clean(path)
        assert len(page.read(".sample")) == 8 * 4 * 4  # the best query, every head and level
    finally:
        page.close()


# --------------------------------------------------------------------------------------------
# Bad input: one line each, no traceback, nothing written


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    import detrkit

    root = tmp_path_factory.mktemp("explore")
    Image.fromarray(image().permute(1, 2, 0).numpy()).save(root / "image.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    torch.save({"conv.weight": torch.zeros(3, 3)}, root / "not_a_detector.pth")
    torch.manual_seed(0)
    detrkit.save(tiny_model("detr"), root / "model")
    (root / "a_file").write_text("")
    return root


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".html", ".tmp"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{root}/broken.png", "--weights", "{root}/model"], "broken.png"),
        (["{root}/missing.png", "--weights", "{root}/model"], "missing.png: no such image file"),
        (["{root}/image.png", "--weights", "{root}/not_a_detector.pth"], "not_a_detector.pth"),
        (["{root}/image.png", "--weights", "{root}/nothing.pth"], "nothing.pth"),
        (["{root}/image.png", "--model", "detr_r50", "--model-option", "x=1"], "unknown"),
        (
            ["{root}/image.png", "--weights", "{root}/model", "--model-option", "enc_layers=1"],
            "--model-option",
        ),
    ],
)
def test_bad_inputs_are_named(files, tmp_path, capsys, arguments, message):
    out = tmp_path / "page.html"
    args = [a.format(root=files) for a in arguments]
    assert main(["explore", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "out, message",
    [
        ("{tmp}", "is a directory"),
        ("{tmp}/missing/page.html", "does not exist"),
        ("{root}/a_file/page.html", "does not exist"),
        ("{tmp}/page.png", "must end in .html"),
        ("{tmp}/existing.html", "holds earlier results"),
        ("{tmp}/link.html", "holds earlier results"),
        ("/proc/page.html", "cannot write into /proc"),  # tried before the model runs
    ],
)
def test_bad_output_paths_are_named(files, tmp_path, capsys, out, message):
    (tmp_path / "existing.html").write_text("an earlier page")
    (tmp_path / "link.html").symlink_to(tmp_path / "elsewhere.html")
    out = out.format(tmp=tmp_path, root=files)
    assert (
        main(["explore", str(files / "image.png"), "--weights", str(files / "model"), "--out", out])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "existing.html").read_text() == "an earlier page"
    assert not (tmp_path / "elsewhere.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.html", "link.html"]


def test_overwrite_replaces_a_link_without_following_it(files, tmp_path, capsys):
    target = tmp_path / "elsewhere.html"
    target.write_text("not ours")
    (tmp_path / "page.html").symlink_to(target)
    args = ["explore", str(files / "image.png"), "--weights", str(files / "model")]
    assert (
        main([*args, "--out", str(tmp_path / "page.html"), "--overwrite", "--threshold", "0"]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert target.read_text() == "not ours"
    assert not (tmp_path / "page.html").is_symlink()
    assert "detrkit explore" in (tmp_path / "page.html").read_text()


def test_a_failure_while_writing_leaves_no_page(files, tmp_path, monkeypatch, capsys):
    from detrkit.inference import explore as module

    def fail(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "render_page", fail)
    args = ["explore", str(files / "image.png"), "--weights", str(files / "model")]
    assert main([*args, "--out", str(tmp_path / "page.html")]) == 2
    assert "No space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_trace_of_a_checkpoint_on_an_image_matches_the_page(files, tmp_path, capsys):
    """``trace --weights --image`` and the page describe the same pass: the same nodes, shapes."""
    args = ["--weights", str(files / "model")]
    assert main(["trace", *args, "--image", str(files / "image.png"), "--short-side", "0"]) == 0
    table = capsys.readouterr().out
    assert f"resized to {HEIGHT}x{WIDTH}" in table
    model = tiny_model("detr")
    batch = Detector(model, size=None, device="cpu").preprocess([image()])[0]
    for node in trace_model(model, batch):
        assert node.label in table
        assert "[" + ", ".join(map(str, node.calls[-1].shape)) + "]" in table


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gets_a_page_of_its_whole_flow(name, tmp_path):
    """Every preset: a page naming its variant and formula, whose every graph node was recorded
    in the pass and points at the line of detrkit's code that computes it."""
    backbone = "resnet50" if PRESETS[name].dilation else "resnet18"
    options = dict(backbone=backbone, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2)
    if isinstance(PRESETS[name], DETRSegmentationConfig):  # the mask head's group norms
        options.update(hidden_dim=128, nheads=8)
    torch.manual_seed(0)
    model = detrkit.build_model(name, **options, dim_feedforward=32, num_queries=8).eval()
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    path, data = explore(detector, image(), tmp_path / "page.html", name)
    assert path.read_text().count("<script") == 2  # the data and the script, nothing fetched
    config = model.config
    if not isinstance(config, DeformableDETRConfig):
        assert data["variant"].startswith("DETR") and ("DC5" in data["variant"]) == config.dilation
    else:
        formulas = set(data["deformable"]["decoder"]["formula"])
        if config.two_stage:
            assert formulas == {"boxes"}
        assert ("two-stage" in data["variant"]) == config.two_stage
        assert ("box refinement" in data["variant"]) == config.with_box_refine
        assert ("points" in formulas) == (not config.two_stage)
        assert ("boxes" in formulas) == (config.two_stage or config.with_box_refine)
    for node in data["graph"]:
        assert node["calls"], node["key"]
        line = (REPO_ROOT / "src" / node["code"]["path"]).read_text().splitlines()
        assert line[node["code"]["number"] - 1].strip() == node["code"]["text"]
        repeated = {"encoder layer": config.enc_layers, "decoder layer": config.dec_layers}
        if node["stage"] in repeated:
            assert len(node["calls"]) == repeated[node["stage"]], node["key"]


def test_a_panoptic_page_shows_the_query_mask(browser, tmp_path):
    """DETR's panoptic models: the query's mask probabilities, as the page draws them, are the
    sigmoid of its pred_masks (in steps of 1/255)."""
    torch.manual_seed(0)
    model = detrkit.build_model(
        "detr_r50_panoptic", backbone="resnet18", enc_layers=1, dec_layers=2, num_queries=5
    ).eval()
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    path, data = explore(detector, image(), tmp_path / "panoptic.html", "panoptic")
    with torch.no_grad():
        _, outputs = detector.detect([image()])
    page = Page(browser, path)
    try:
        page.check_clean(path)
        query = data["detections"][0]["query"]
        page.select_query(query)
        page.page.select_option("#detr-map", "mask")
        (drawn,) = page.read("#mask-overlay")
        probabilities = outputs["pred_masks"][0, query].sigmoid()
        assert int(drawn["query"]) == query
        assert abs(float(drawn["mean"]) - float(probabilities.mean())) <= 0.5 / 255 + 1e-6
        height, width = probabilities.shape
        alpha = page.page.evaluate(
            "([x, y]) => window.explore.state.maskCanvas.getContext('2d')"
            ".getImageData(x, y, 1, 1).data[3]",
            [width // 2, height // 3],
        )
        expected = round(round(float(probabilities[height // 3, width // 2]) * 255) * 0.7)
        assert abs(alpha - expected) <= 1
        page.screenshot("explore_panoptic_mask")
    finally:
        page.close()

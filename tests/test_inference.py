"""Inference and explanation: Detector, captured internals, and what the figures draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.markers import MarkerStyle
from PIL import Image
from torchvision.ops import box_convert

import detrkit
from detrkit.data import ImageReadError
from detrkit.inference import COCO_NAMES, Detector, capture_internals, class_names_for
from detrkit.inference.capture import Internals, SamplingRecord
from detrkit.inference.explain import (
    ExplainedObject,
    box_refinement_figure,
    cross_attention_figure,
    encoder_attention_figure,
    explain,
    explain_figures,
    head_marker,
    sampling_points_figure,
)
from detrkit.ops import ms_deform_attn_reference
from helpers import padded_batch


def tiny(preset: str, **overrides):
    torch.manual_seed(0)
    return detrkit.build_model(preset, **overrides).eval()


def random_image(height: int = 70, width: int = 90, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def by_gid(figure, gid: str):
    """The one artist of a figure with this gid."""
    found = [
        artist
        for ax in figure.axes
        for artist in (*ax.collections, *ax.images, *ax.patches)
        if artist.get_gid() == gid
    ]
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def marker_vertices(marker: str) -> np.ndarray:
    """The outline scatter draws for a marker shape."""
    style = MarkerStyle(marker)
    return style.get_path().transformed(style.get_transform()).vertices


def legend_text(figure) -> str:
    """Every label of the figure's legend (the key to its marks), one per line."""
    (legend,) = figure.legends
    return "\n".join(text.get_text() for text in legend.get_texts())


# ---------------------------------------------------------------------------------------------
# Detector


def test_coco_names_by_category_id():
    assert len(COCO_NAMES) == 91
    assert (COCO_NAMES[1], COCO_NAMES[17], COCO_NAMES[90]) == ("person", "cat", "toothbrush")
    unused = [i for i, name in enumerate(COCO_NAMES) if name == "N/A"]
    assert unused == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert class_names_for(detrkit.DETRConfig()) == list(COCO_NAMES)
    assert class_names_for(detrkit.DETRConfig(num_classes=3)) == ["0", "1", "2"]
    named = detrkit.DETRConfig(num_classes=2, class_names=["cat", "dog"])
    assert class_names_for(named) == ["cat", "dog"]


def test_every_kind_of_input_gives_the_same_detections(tmp_path):
    detector = Detector(tiny("detr_digits"), threshold=0.0, size=64, device="cpu")
    pixels = random_image()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "image.png")
    inputs = {
        "tensor": pixels,
        "float tensor": pixels.float() / 255,
        "path": tmp_path / "image.png",
        "str path": str(tmp_path / "image.png"),
        "PIL": Image.open(tmp_path / "image.png"),
        "numpy HWC": pixels.permute(1, 2, 0).numpy(),
        "RGBA numpy": np.concatenate(
            [pixels.permute(1, 2, 0).numpy(), np.full((70, 90, 1), 7, np.uint8)], -1
        ),
    }
    reference = detector(pixels)
    assert len(reference) == 20 and reference.image_size == (70, 90)
    for kind, image in inputs.items():
        found = detector(image)
        torch.testing.assert_close(found.boxes, reference.boxes, msg=kind)
        assert found.names == reference.names, kind


def test_boxes_come_back_in_the_input_images_pixels():
    model = tiny("deformable_detr_digits")
    detector = Detector(model, threshold=0.0, size=64, device="cpu")
    # Resized to short side 64: 64 x 85 and 64 x 74, so only the second is padded.
    large, small = random_image(120, 160, seed=1), random_image(60, 70, seed=2)
    found = detector([large, small])
    assert [f.image_size for f in found] == [(120, 160), (60, 70)]

    # The larger image has no padding: alone or in the batch it gives the same detections.
    alone = detector(large)
    torch.testing.assert_close(found[0].boxes, alone.boxes, atol=1e-3, rtol=0)
    assert found[0].names == alone.names

    # Each box is the model's normalised box of its query, scaled by the *input* image's size
    # (the model saw a 64-pixel short side).
    batch, mask = detector.preprocess([large, small])
    assert batch.shape[-2:] == (64, 85) and mask[1].any()
    with torch.no_grad():
        outputs = model(batch, mask)
    for image, (height, width) in enumerate([(120, 160), (60, 70)]):
        normalised = box_convert(outputs["pred_boxes"][image], "cxcywh", "xyxy")
        expected = normalised[found[image].queries] * torch.tensor([width, height] * 2)
        torch.testing.assert_close(found[image].boxes, expected, atol=1e-3, rtol=0)
        assert found[image].names == [str(int(label)) for label in found[image].labels]


def test_threshold_and_names():
    model = tiny("detr_digits", class_names=[f"digit {i}" for i in range(10)])
    everything = Detector(model, threshold=0.0, size=64, device="cpu")(random_image())
    cut = float(everything.scores.median())
    kept = Detector(model, threshold=cut, size=64, device="cpu")(random_image())
    assert len(kept) == int((everything.scores >= cut).sum()) and len(kept) < len(everything)
    assert all(name.startswith("digit ") for name in kept.names)
    # Best first (DETR's post-processing lists them in query order), a detection a query.
    assert torch.equal(everything.scores, everything.scores.sort(descending=True).values)
    assert sorted(everything.queries.tolist()) == list(range(model.config.num_queries))
    coco = Detector(tiny("detr_digits", num_classes=91), threshold=0.0, size=64, device="cpu")
    found = coco(random_image())
    assert found.names == [COCO_NAMES[int(label)] for label in found.labels]


def test_bad_inputs_are_named(tmp_path):
    detector = Detector(tiny("detr_digits"), size=64, device="cpu")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        detector(torch.full((3, 10, 10), 2.0))
    with pytest.raises(ValueError, match=r"\[C, H, W\] with 1, 3 or 4 channels"):
        detector(torch.zeros(5, 10, 10, dtype=torch.uint8))
    with pytest.raises(ImageReadError, match=r"missing\.png: no such image file"):
        detector(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="a folder, not an image file"):
        detector(tmp_path)
    with pytest.raises(TypeError, match="got int"):
        detector(3)
    with pytest.raises(ValueError, match="threshold must be in"):
        Detector(tiny("detr_digits"), threshold=1.5)


def test_from_checkpoint(tmp_path):
    model = tiny("detr_digits")
    detrkit.save(model, tmp_path / "model")
    detector = detrkit.Detector.from_checkpoint(
        tmp_path / "model", device="cpu", threshold=0.0, size=64
    )
    expected = Detector(model, threshold=0.0, size=64, device="cpu")(random_image())
    torch.testing.assert_close(detector(random_image()).boxes, expected.boxes)


# ---------------------------------------------------------------------------------------------
# Captured internals


DEFORMABLE_VARIANTS = {
    "points": dict(with_box_refine=False),  # plain: 2-D reference points in every layer
    "refine": dict(with_box_refine=True),  # boxes as references from layer 2 on
    "two-stage": dict(with_box_refine=True, two_stage=True),  # boxes from the start
}


@pytest.mark.parametrize("variant", list(DEFORMABLE_VARIANTS))
def test_deformable_internals_are_consistent(variant):
    model = tiny("deformable_detr_digits", **DEFORMABLE_VARIANTS[variant])
    images, mask = padded_batch()  # the second image is padded: valid ratios below 1
    images, mask = images[:, :, :96, :128], mask[:, :96, :128]

    # What the attention really computed, recorded independently of capture_internals.
    seen = {}
    layer = model.transformer.decoder.layers[-1].cross_attn
    layer.register_forward_hook(lambda module, args, output: seen.update(args=args, output=output))
    with torch.no_grad():
        plain = model(images, mask)
        with capture_internals(model) as internals:
            captured = model(images, mask)
    torch.testing.assert_close(captured["pred_boxes"], plain["pred_boxes"], rtol=0, atol=0)
    assert len(internals.encoder_sampling) == 2 and len(internals.decoder_sampling) == 3
    assert internals.valid_ratios[1].lt(1).any() and internals.valid_ratios[0].eq(1).all()

    for record in internals.encoder_sampling + internals.decoder_sampling:
        module = model.get_submodule(record.name)
        heads, levels, points = record.sampling_locations.shape[2:5]
        assert (heads, levels, points) == (4, 4, 4)
        shapes = record.spatial_shapes
        starts = torch.cat([torch.zeros(1, dtype=torch.long), shapes.prod(1).cumsum(0)[:-1]])
        assert torch.equal(record.level_start_index, starts)
        # Offsets, predicted from the query, are in pixels of each level...
        offsets = module.sampling_offsets(record.query).view(*record.sampling_locations.shape)
        reference = record.reference_points[:, :, None, :, None, :]  # [B, Lq, 1, L, 1, 2 or 4]
        size = shapes.flip(-1)[None, None, None, :, None, :].float()  # [.., L, .., 2] (W, H)
        if record.reference_points.shape[-1] == 2:
            in_level_pixels = (record.sampling_locations - reference) * size
            torch.testing.assert_close(in_level_pixels, offsets, atol=1e-4, rtol=1e-4)
        else:  # ...or, for reference boxes, in units of half the box over the number of points
            in_box_units = (record.sampling_locations - reference[..., :2]) / reference[..., 2:]
            torch.testing.assert_close(in_box_units * 2 * points, offsets, atol=1e-3, rtol=1e-3)
        # The weights of every query and head sum to 1 over levels x points.
        sums = record.attention_weights.sum((-1, -2))  # [B, Lq, M]
        torch.testing.assert_close(sums, torch.ones_like(sums))

    # The recorded locations and weights are the ones the layer used.
    record = internals.decoder_sampling[-1]
    _, _, memory, shapes, starts, padding = seen["args"]
    value = layer.value_proj(memory).masked_fill(padding[..., None], 0.0)
    value = value.view(*value.shape[:2], 4, -1)
    recomputed = layer.output_proj(
        ms_deform_attn_reference(
            value, shapes, starts, record.sampling_locations, record.attention_weights
        )
    )
    torch.testing.assert_close(recomputed, seen["output"], atol=1e-5, rtol=1e-4)

    # Each layer's references are that layer's boxes when boxes are refined; the last is the
    # prediction.
    if model.config.with_box_refine:
        torch.testing.assert_close(internals.layer_references[-1], captured["pred_boxes"])
    first = 4 if variant == "two-stage" else 2
    assert internals.initial_reference.shape[-1] == first


def test_detr_internals():
    model = tiny("detr_digits")
    images, mask = padded_batch()
    with torch.no_grad():
        plain = model(images, mask)
        with capture_internals(model) as internals:
            captured = model(images, mask)
    torch.testing.assert_close(captured["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=0)
    height, width = internals.feature_shape
    assert (height, width) == (4, 5)
    cross = internals.decoder_cross_attention[-1].weights  # [B, M, Q, H*W]
    assert cross.shape == (2, 4, 20, height * width)
    assert len(internals.encoder_attention) == 2 and len(internals.decoder_self_attention) == 2
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 4, 20))
    # Padded positions of the second image get no attention.
    padded = internals.padding_mask[1]
    assert padded.any() and cross[1][..., padded].eq(0).all()
    # The hooks are gone after the block.
    with torch.no_grad():
        model(images, mask)
    assert len(internals.decoder_cross_attention) == 2


# ---------------------------------------------------------------------------------------------
# What the figures draw


def _objects(found, count: int = 2) -> list[ExplainedObject]:
    return [
        ExplainedObject(i + 1, int(found.queries[i]), found.names[i], float(found.scores[i]), box)
        for i, box in enumerate(found.boxes[:count])
    ]


def test_sampling_points_land_where_the_numbers_say():
    model = tiny("deformable_detr_digits", two_stage=True)
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    large, small = random_image(96, 128), random_image(80, 72, seed=3)  # the small one is padded
    with torch.no_grad(), capture_internals(model) as internals:
        found, _ = detector.detect([large, small])
    assert internals.valid_ratios[1, 0].lt(1).all()  # padded on the finest level at least
    query = int(found[1].queries[0])
    figure = sampling_points_figure(
        small, internals.decoder_sampling, query, internals.valid_ratios, "t", "layer", batch=1
    )
    heads = internals.decoder_sampling[0].sampling_locations.shape[2]
    vmax = max(float(r.attention_weights[1, query].max()) for r in internals.decoder_sampling)
    for row, record in enumerate(internals.decoder_sampling):
        for level in range(4):
            ratio = internals.valid_ratios[1, level]  # (w, h) unpadded fraction
            for head in range(heads):
                locations = record.sampling_locations[1, query, head, level]  # [P, 2]
                expected = locations / ratio * torch.tensor([72.0, 80.0])  # image pixels (x, y)
                points = by_gid(figure, f"sampling/{row}/{level}/head{head + 1}")
                np.testing.assert_allclose(points.get_offsets(), expected.numpy(), rtol=1e-5)
                weights = record.attention_weights[1, query, head, level]
                np.testing.assert_allclose(points.get_array(), weights.numpy(), rtol=1e-6)
                # One colour scale for the whole figure; one marker shape per head.
                assert (points.norm.vmin, points.norm.vmax) == (0, pytest.approx(vmax))
                np.testing.assert_allclose(
                    points.get_paths()[0].vertices, marker_vertices(head_marker(head))
                )
            centre = record.reference_points[1, query, level, :2] / ratio * torch.tensor([72, 80])
            marker = by_gid(figure, f"reference/{row}/{level}")
            np.testing.assert_allclose(marker.get_offsets()[0], centre.numpy(), rtol=1e-5)
    assert len({head_marker(m) for m in range(8)}) == 8
    # Data coordinates are image pixels, y down: the image lies in [0, W] x [0, H] in every panel.
    for ax in figure.axes[:-1]:  # the last is the colorbar
        left, right, bottom, top = ax.images[0].get_extent()
        assert 0 <= left < right <= 72 and 0 <= top < bottom <= 80
    key = legend_text(figure)
    assert "reference point" in key and "reference box" in key and "head 4" in key

    obj = _objects(found[1], 1)[0]
    refinement = box_refinement_figure(small, internals, obj, batch=1)
    last = by_gid(refinement, f"box/{len(internals.decoder_sampling)}")
    x1, y1, x2, y2 = obj.box.tolist()  # the detection is the box after the last layer
    np.testing.assert_allclose(
        [last.get_x(), last.get_y(), last.get_width(), last.get_height()],
        [x1, y1, x2 - x1, y2 - y1],
        atol=1e-3,
    )
    proposal = by_gid(refinement, "initial")  # two-stage: the encoder's proposal box
    cx, _, w, _ = internals.initial_reference[1, obj.query].tolist()
    np.testing.assert_allclose(
        [proposal.get_x(), proposal.get_width()], [(cx - w / 2) * 72, w * 72], rtol=1e-4
    )


def _limits(ax) -> tuple[float, float, float, float]:
    """A panel's view as (x1, y1, x2, y2) in image pixels (y points down)."""
    (x1, x2), (y2, y1) = ax.get_xlim(), ax.get_ylim()
    assert x1 < x2 and y1 < y2
    return x1, y1, x2, y2


def _contains(limits, points) -> bool:
    x1, y1, x2, y2 = limits
    x, y = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2).unbind(-1)
    return bool(((x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)).all())


def test_panels_zoom_to_small_spreads_only():
    """A panel whose marks cover a small part of the image zooms to them, keeping them all in
    view; a wide spread keeps the whole image."""
    height, width = 200, 300
    generator = torch.Generator().manual_seed(0)
    reference = torch.tensor([0.5, 0.4]).expand(1, 1, 2, 2)  # [B, Lq, L, 2]
    near = reference[0, 0, 0] + 0.02 * torch.randn(2, 3, 2, generator=generator)  # [M, P, 2]
    far = torch.rand(2, 3, 2, generator=generator) * 0.9 + 0.05  # anywhere in the image
    locations = torch.stack([near, far], dim=1)[None, None]  # [B, Lq, M, L, P, 2]
    record = SamplingRecord(
        "layer",
        query=torch.zeros(1, 1, 8),
        reference_points=reference,
        sampling_locations=locations,
        attention_weights=torch.rand(1, 1, 2, 2, 3, generator=generator),
        spatial_shapes=torch.tensor([[20, 30], [10, 15]]),
        level_start_index=torch.tensor([0, 600]),
    )
    image = random_image(height, width)
    figure = sampling_points_figure(image, [record], 0, torch.ones(1, 2, 2), "t", "layer")
    pixels = locations[0, 0] * torch.tensor([width, height])  # [M, L, P, 2]
    centre = reference[0, 0, 0] * torch.tensor([width, height])

    small, wide = figure.axes[:2]
    limits = _limits(small)
    assert _contains(limits, pixels[:, 0]) and _contains(limits, centre)
    assert limits[2] - limits[0] < width / 4 and limits[3] - limits[1] < height / 4
    assert "zoomed" in small.get_title() and small.images  # the image is still drawn behind
    assert _limits(wide) == (0, 0, width, height) and "zoomed" not in wide.get_title()

    # Box refinement: the view is the union of the boxes when they are small.
    boxes = torch.tensor(
        [[0.30, 0.60, 0.06, 0.05], [0.31, 0.61, 0.05, 0.05], [0.31, 0.6, 0.05, 0.04]]
    )
    internals = Internals(
        "deformable_detr",
        initial_reference=torch.tensor([[[0.3, 0.6]]]),  # [B, Q, 2] a point
        layer_references=boxes[:, None, None],  # [L, B, Q, 4]
    )
    obj = ExplainedObject(1, 0, "cat", 0.9, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    figure = box_refinement_figure(image, internals, obj)
    corners = box_convert(boxes, "cxcywh", "xyxy").view(-1, 2) * torch.tensor([width, height])
    limits = _limits(figure.axes[0])
    assert _contains(limits, corners) and limits[2] - limits[0] < width / 4
    assert "zoomed" in figure.get_suptitle()
    key = legend_text(figure)
    assert "first reference point" in key and "3: after layer 3" in key and "the detection" in key
    # The boxes on top of one another differ in line style and width, and carry their number.
    styles = {
        (by_gid(figure, f"box/{k}").get_linestyle(), by_gid(figure, f"box/{k}").get_linewidth())
        for k in (1, 2, 3)
    }
    assert len(styles) == 3
    tags = [text.get_text() for text in figure.axes[0].texts]
    assert tags == ["1", "2", "3"]

    internals.layer_references = torch.tensor([[[[0.5, 0.5, 0.8, 0.7]]]])
    figure = box_refinement_figure(image, internals, obj)
    assert _limits(figure.axes[0]) == (0, 0, width, height)


def test_detr_figures_show_the_captured_attention():
    model = tiny("detr_digits")
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    image = random_image(96, 160)
    with torch.no_grad(), capture_internals(model) as internals:
        (found,), _ = detector.detect([image])
    obj = _objects(found, 1)[0]
    figure = cross_attention_figure(image, internals, obj)
    weights = internals.decoder_cross_attention[-1].weights[0, :, obj.query]  # [M, H*W]
    maps = weights.view(4, 3, 5)
    np.testing.assert_allclose(by_gid(figure, "attention/mean").get_array(), maps.mean(0))
    np.testing.assert_allclose(by_gid(figure, "attention/head3").get_array(), maps[2])
    assert list(by_gid(figure, "attention/mean").get_extent()) == [0, 160, 96, 0]
    key = legend_text(figure)
    assert "cyan box: the detection" in key and "overlay: the query's attention weight" in key

    # Pixel (100, 70) lies in cell (row 2, column 3) of the 3 x 5 map.
    figure = encoder_attention_figure(image, internals, [(100.0, 70.0)])
    expected = internals.encoder_attention[-1].weights[0, :, 2 * 5 + 3].mean(0).view(3, 5)
    np.testing.assert_allclose(by_gid(figure, "attention/pixel1").get_array(), expected)
    np.testing.assert_allclose(by_gid(figure, "pixel/1").get_offsets()[0], [100.0, 70.0])
    cell = by_gid(figure, "cell/1")  # 32 x 32 pixels per cell
    assert (cell.get_x(), cell.get_y(), cell.get_width(), cell.get_height()) == (96, 64, 32, 32)
    key = legend_text(figure)
    assert "+: the chosen pixel" in key and "its feature-map cell" in key and "overlay" in key


def test_explain_writes_figures_and_checks_pixels(tmp_path):
    model = tiny("deformable_detr_digits", enc_layers=1, dec_layers=2)
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    objects, written, _ = explain(detector, random_image(), tmp_path, [(5.0, 60.0)], max_objects=1)
    assert [path.name for path in written] == [
        "detections.png",
        "object1_sampling_points.png",
        "object1_box_refinement.png",
        "encoder_pixel1_sampling_points.png",
    ]
    assert all(Image.open(path).size[0] > 300 for path in written)
    assert len(objects) == 1 and objects[0].number == 1

    nothing = Detector(model, threshold=1.0, size=None, device="cpu")
    objects, written, highest = explain(nothing, random_image(), tmp_path / "none")
    assert objects == [] and written[0].name == "detections.png"
    assert len(written) == 4  # three automatically picked pixels
    # The picture says how far the best candidate was from the threshold.
    best = detector(random_image())
    assert (highest.score, highest.name, highest.query) == (
        pytest.approx(float(best.scores[0])),
        best.names[0],
        int(best.queries[0]),
    )
    _, figures, _ = explain_figures(nothing, random_image(), max_objects=1)
    title = figures["detections.png"].get_suptitle().replace("\n", " ")
    assert f"Nothing scored at least 1.0 (the highest score was {highest.score:.2f}" in title
    assert "highest-scoring candidate" in legend_text(figures["detections.png"])
    np.testing.assert_allclose(
        by_gid(figures["detections.png"], "highest").get_xy(), best.boxes[0, :2]
    )
    with pytest.raises(ValueError, match=r"pixel \(90.0, 5.0\) is outside the image"):
        explain(detector, random_image(), tmp_path, [(90.0, 5.0)])

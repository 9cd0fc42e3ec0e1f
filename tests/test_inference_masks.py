"""Masks in ``Detector``, ``detrkit predict`` (--panoptic) and ``detrkit explain`` for DETR's
panoptic models: a tiny random ``detr_digits_panoptic`` on tiny images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

import detrkit
from detrkit.cli.main import main
from detrkit.data.drawing import draw_detections, draw_masks
from detrkit.data.panoptic import read_segment_ids, validate_panoptic
from detrkit.inference import Detector
from detrkit.inference.explain import explain, explain_figures
from detrkit.models.config import DETRSegmentationConfig
from detrkit.models.postprocess import instance_masks, mask_probabilities

NAMES = [str(digit) for digit in range(10)] + ["canvas"]
THINGS = [True] * 10 + [False]
SIZES = [(96, 128), (64, 80)]  # (height, width), multiples of 4 (the masks' stride)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return detrkit.build_model(
        "detr_digits_panoptic", num_queries=5, class_names=NAMES, is_thing=THINGS
    ).eval()


def make_images(sizes=SIZES, seed: int = 1, block: int = 1) -> list[torch.Tensor]:
    """Random images, of squares of ``block`` pixels."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sizes:
        shape = (3, height // block, width // block)
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        images.append(image.repeat_interleave(block, 1).repeat_interleave(block, 2))
    return images


def sure_model() -> nn.Module:
    """The tiny model with its class head set so that, on image 0, queries 0 and 1 are the digit
    3 (things) and the other three the canvas (stuff), every one scoring about 1."""
    model = tiny_model()
    detector = Detector(model, size=None, device="cpu")
    seen = []
    hook = model.detr.class_embed.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    detector(make_images()[0])
    hook.remove()
    hs = seen[0][-1, 0]  # the last decoder layer's outputs [Q, C]
    with torch.no_grad():
        direction = hs[:2].mean(0) - hs[2:].mean(0)
        middle = direction @ hs.mean(0)
        scale = 50 / direction.norm() ** 2
        head = model.detr.class_embed
        head.weight.zero_()
        head.bias.zero_()
        head.weight[3], head.bias[3] = scale * direction, 8 - scale * middle
        head.weight[10], head.bias[10] = -scale * direction, 8 + scale * middle
    return model


@pytest.fixture(scope="module")
def model():
    return sure_model()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return detrkit.save(model, tmp_path_factory.mktemp("ckpt") / "panoptic")


@pytest.fixture(scope="module")
def detection_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = detrkit.build_model("detr_digits", num_queries=5)
    return detrkit.save(model, tmp_path_factory.mktemp("ckpt") / "detection")


def write_images(directory, images, names):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        path = directory / name
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# is_thing


def test_is_thing_in_the_config_and_its_defaults():
    config = tiny_model().config
    assert config.thing_classes() == THINGS
    assert DETRSegmentationConfig.from_dict(config.to_dict()).is_thing == THINGS
    # None: every class a thing, except for COCO panoptic's 250 ids (things up to 90).
    assert detrkit.build_model("detr_digits_panoptic").config.thing_classes() == [True] * 11
    coco = detrkit.models.build_config("detr_r50_panoptic").thing_classes()
    assert coco[1] and coco[90] and not coco[92] and not coco[200] and sum(coco) == 91
    with pytest.raises(ValueError, match="is_thing has 2 entries but num_classes is 11"):
        detrkit.models.build_config("detr_digits_panoptic", is_thing=[True, False])
    with pytest.raises(ValueError, match="is_thing must be a list of true/false"):
        detrkit.models.build_config("detr_digits_panoptic", is_thing=["yes"] * 11)


# ---------------------------------------------------------------------------------------------
# Detector


@pytest.mark.parametrize("size", [None, 64])
def test_detection_masks_are_the_models_instance_masks(model, size):
    detector = Detector(model, threshold=0.0, size=size, device="cpu")
    image = make_images()[0]
    found = detector(image)
    assert found.masks is not None and found.masks.dtype == torch.bool
    assert found.masks.shape == (len(found), *image.shape[-2:])

    batch, mask = detector.preprocess([image])
    with torch.no_grad():
        outputs = model(batch, mask)
    resized = batch.shape[-2:]  # one image: nothing padded
    if size is not None:
        assert min(resized) == size
    expected = instance_masks(
        outputs["pred_masks"][0], found.queries, resized, resized, image.shape[-2:]
    )
    assert torch.equal(found.masks, expected)
    assert 0 < found.masks.float().mean() < 1
    assert found.as_dict()["masks"] is found.masks


def test_detection_models_have_no_masks(detection_checkpoint):
    detector = Detector.from_checkpoint(detection_checkpoint, threshold=0.0, size=None)
    assert not detector.has_masks
    assert detector(make_images()[0]).masks is None
    with pytest.raises(ValueError, match=r"a detection model \(detr\) has no masks: panoptic"):
        detector.panoptic(make_images()[0])


class PixelMasks(nn.Module):
    """The model, with mask logits made of the image itself (its mean at stride 4): what a
    query's mask holds then does not depend on what else is in the batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, images, mask=None):
        outputs = self.model(images, mask)
        # Normalised mid-grey is about 0.23: logits of either sign.
        pixels = F.avg_pool2d(images.mean(1, keepdim=True), 4) - 0.23  # [B, 1, H/4, W/4]
        offsets = torch.linspace(-0.5, 0.5, outputs["pred_logits"].shape[1])
        outputs["pred_masks"] = 4 * pixels + offsets[None, :, None, None]
        return outputs


def by_query(found):
    order = found.queries.argsort()
    return found.queries[order], found.masks[order]


def test_batched_and_single_images_give_the_same_masks(model):
    # Padding changes what a random model sees; the masks' geometry must not change: an image
    # padded in a batch has the masks it has alone (but at the last pixels, where the padded
    # map's upsampling reaches the padding, as in the original).
    detector = Detector(PixelMasks(model), threshold=0.0, size=None, device="cpu")
    images = make_images(block=8)
    batched = detector(images)
    for image, found in zip(images, batched):
        alone = detector(image)
        queries, masks = by_query(found)
        alone_queries, alone_masks = by_query(alone)
        assert torch.equal(queries, alone_queries)
        assert masks.shape == alone_masks.shape == (len(found), *image.shape[-2:])
        assert torch.equal(masks[:, :-4, :-4], alone_masks[:, :-4, :-4])
        assert 0.2 < masks.float().mean() < 0.8  # the test is not of empty or full masks

    # The real model: the unpadded image in a batch has the masks it has alone.
    detector = Detector(model, threshold=0.0, size=None, device="cpu")
    images = make_images()
    queries, masks = by_query(detector(images)[0])
    alone_queries, alone_masks = by_query(detector(images[0]))
    assert torch.equal(queries, alone_queries) and torch.equal(masks, alone_masks)


def test_panoptic_segments_cover_the_image(model):
    detector = Detector(model, size=None, device="cpu")
    images = make_images()
    results = detector.panoptic(images)
    assert len(results) == 2
    first = results[0]
    assert [(s.label, s.name, s.isthing) for s in first.segments] == [
        (3, "3", True),
        (3, "3", True),
        (10, "canvas", False),  # the canvas's three queries, one segment
    ]
    for image, result in zip(images, results):
        ids = result.segment_ids
        assert ids.shape == image.shape[-2:] and ids.dtype == torch.int64
        listed = {segment.id for segment in result.segments}
        assert set(ids.unique().tolist()) - {0} == listed
        for segment in result.segments:
            assert segment.area == int((ids == segment.id).sum()) > 0
            assert segment.category_id == segment.label and 0.9 < segment.score <= 1
        assert sum(s.area for s in result.segments) + int((ids == 0).sum()) == ids.numel()
    # One image alone: as in the list (but for pixels where two queries' logits are within
    # the float noise of batching: a random model's queries have near-equal mask logits).
    alone = detector.panoptic(images[0])
    assert (alone.segment_ids == first.segment_ids).float().mean() > 0.95
    assert [s.label for s in alone.segments] == [s.label for s in first.segments]
    # A threshold no query reaches: nothing.
    assert len(detector.panoptic(images[0], threshold=1.0)) == 0


# ---------------------------------------------------------------------------------------------
# detrkit predict


def predict_args(weights, out, *more):
    args = ["predict", "--weights", str(weights), "--out", str(out), "--threshold", "0.0"]
    return [*args, "--short-side", "0", *more]


def test_predict_panoptic_writes_pngs_json_and_masks(tmp_path, model, checkpoint, capsys):
    images = make_images()
    paths = write_images(tmp_path / "in", images, ["7.png", "9.png"])
    out = tmp_path / "out"
    args = predict_args(checkpoint, out, "--panoptic", "--batch-size", "2")
    assert main([*args, *map(str, paths)]) == 0
    printed = capsys.readouterr().out
    assert "panoptic segments" in printed and "panoptic.json" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "7.png",
        "9.png",
        "detections.json",
        "images.json",
        "panoptic",
        "panoptic.json",
    ]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["7.png", "9.png"]

    # As the command makes it (its default --precision fp32 folds the batch norms).
    detector = Detector.from_checkpoint(
        checkpoint, threshold=0.0, size=None, device="cpu", precision="fp32"
    )
    data = json.loads((out / "panoptic.json").read_text())
    # Valid COCO panoptic; its images are the input files, wherever they are (as in images.json).
    errors = [e for e in validate_panoptic(data).errors if e.kind != "unsafe_file_name"]
    assert not errors, errors
    assert data["images"] == json.loads((out / "images.json").read_text())
    assert data["categories"] == [
        {"id": i, "name": name, "isthing": int(thing)}
        for i, (name, thing) in enumerate(zip(NAMES, THINGS))
    ]
    annotations = {a["image_id"]: a for a in data["annotations"]}
    results = json.loads((out / "detections.json").read_text())
    # As predict ran them: in one batch.
    segmentations, detections = detector.panoptic(images), detector(images)
    for image_id, image, path, expected, found in zip(
        (7, 9), images, paths, segmentations, detections
    ):
        annotation = annotations[image_id]
        assert annotation["file_name"] == path.name
        ids = read_segment_ids(out / "panoptic" / annotation["file_name"])
        info = annotation["segments_info"]
        # The PNG's ids are exactly the JSON's segments'.
        assert set(ids.unique().tolist()) - {0} == {s["id"] for s in info}
        assert torch.equal(ids, expected.segment_ids)
        for segment, want in zip(info, expected.segments):
            rows, cols = torch.nonzero(ids == segment["id"], as_tuple=True)
            x, y = int(cols.min()), int(rows.min())
            assert segment["bbox"] == [x, y, int(cols.max()) + 1 - x, int(rows.max()) + 1 - y]
            assert segment["area"] == want.area == int((ids == segment["id"]).sum())
            assert (segment["category_id"], segment["isthing"]) == (want.label, int(want.isthing))
            assert segment["score"] == pytest.approx(want.score, abs=1e-5)

        # detections.json: each detection's RLE decodes to the mask drawn under its box.
        mine = [r for r in results if r["image_id"] == image_id]
        assert len(mine) == len(found) == 5
        decoded = torch.from_numpy(
            np.stack([mask_utils.decode(r["segmentation"]) for r in mine])
        ).bool()
        assert torch.equal(decoded, found.masks)
        drawn = draw_detections(
            draw_masks(image, decoded, found.labels), found.boxes, found.captions(), found.labels
        )
        picture = torch.from_numpy(np.array(Image.open(out / path.name))).permute(2, 0, 1)
        assert torch.equal(picture, drawn)
        # The masks changed the picture: not only the boxes did.
        boxes_only = draw_detections(image, found.boxes, found.captions(), found.labels)
        assert (picture != boxes_only).any(0).float().mean() > 0.2


def test_predict_panoptic_refuses_a_detection_checkpoint(tmp_path, detection_checkpoint, capsys):
    paths = write_images(tmp_path / "in", make_images()[:1], ["a.png"])
    out = tmp_path / "out"
    assert main([*predict_args(detection_checkpoint, out, "--panoptic"), str(paths[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"detrkit: error: --weights {detection_checkpoint}: ")
    assert "has no masks" in err and "detr_segmentation" in err
    assert not out.exists()


def test_predict_panoptic_never_overwrites_unasked(tmp_path, checkpoint, capsys):
    paths = write_images(tmp_path / "in", make_images(), ["a.png", "b.jpg"])
    out = tmp_path / "out"
    args = [*predict_args(checkpoint, out, "--panoptic"), *map(str, paths)]
    assert main(args) == 0
    # Only the panoptic files there: still earlier results.
    for name in ("a.png", "b.jpg", "detections.json", "images.json"):
        (out / name).unlink()
    before = {p: p.read_bytes() for p in [out / "panoptic.json", *(out / "panoptic").iterdir()]}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds earlier results" in err and "panoptic.json" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before
    assert not (out / "detections.json").exists()
    # Without --panoptic those files are not its results: they stay as they are.
    assert main([*predict_args(checkpoint, out), *map(str, paths)]) == 0
    assert {p: p.read_bytes() for p in before} == before
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------
# detrkit explain


def test_explain_shows_a_panoptic_querys_mask(tmp_path, model):
    detector = Detector(model, threshold=0.5, size=None, device="cpu")
    image = make_images()[0]
    objects, figures, _ = explain_figures(detector, image, [(40.0, 30.0)], max_objects=2)
    assert len(objects) == 2
    for obj in objects:
        figure = figures[f"object{obj.number}_cross_attention.png"]
        (shown,) = [a for ax in figure.axes for a in ax.get_images() if a.get_gid() == "mask"]
        batch, mask = detector.preprocess([image])
        with torch.no_grad():
            pred_masks = model(batch, mask)["pred_masks"][0]
        size = image.shape[-2:]
        expected = mask_probabilities(pred_masks, torch.tensor([obj.query]), size, size, size)[0]
        torch.testing.assert_close(torch.from_numpy(np.asarray(shown.get_array())), expected)
        gids = {a.get_gid() for ax in figure.axes for a in ax.get_children()}
        assert {"mask/outline", "attention/mean", "attention/head1", "box"} <= gids
        legend = [t.get_text() for t in figure.legends[0].get_texts()]
        assert any("mask probability" in text for text in legend)

    written = explain(detector, image, tmp_path, max_objects=1)[1]
    assert (tmp_path / "object1_cross_attention.png") in written
    assert Image.open(tmp_path / "object1_cross_attention.png").size[0] > 0


def test_training_gives_the_model_the_datasets_stuff_classes():
    from types import SimpleNamespace

    from detrkit.engine.config import TrainConfig
    from detrkit.engine.train import build_training_model

    dataset = SimpleNamespace(
        num_classes=11, class_names=NAMES, category_ids=list(range(11)), is_thing=THINGS
    )
    options = {"num_queries": 5}
    config = TrainConfig(model="detr_digits_panoptic", model_options=options)
    model = build_training_model(config, dataset, log=lambda line: None)
    assert model.config.is_thing == THINGS and model.config.thing_classes() == THINGS
    # A detection model has no such field.
    config = TrainConfig(model="detr_digits", model_options=options)
    model = build_training_model(config, dataset, log=lambda line: None)
    assert not hasattr(model.config, "is_thing")

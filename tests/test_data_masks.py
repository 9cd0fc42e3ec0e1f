"""Instance masks (CocoDetection(masks=True)), COCO's panoptic format (CocoPanoptic), their
panoptic_target, and what ``detrkit data check`` and the loaders say about broken ones."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import v2

from detrkit.cli.main import main
from detrkit.data import (
    AugmentationConfig,
    CocoDetection,
    CocoFormatError,
    CocoPanoptic,
    DigitsDetection,
    ImageReadError,
    check_dataset,
    make_scene,
    make_train_transforms,
    pq_categories,
    write_digits_coco,
)
from detrkit.data.check import check_panoptic
from detrkit.data.digits import panoptic_png
from detrkit.data.panoptic import VOID, read_segment_ids
from detrkit.data.transforms import RandomShortSideResize

NUM_IMAGES = 2


@pytest.fixture
def digits(tmp_path: Path) -> dict[str, Path]:
    """Two digit scenes with instance masks (RLE) and their panoptic version."""
    written = write_digits_coco(tmp_path / "digits", NUM_IMAGES, 0, masks=True)
    return {
        "images": tmp_path / "digits" / "train",
        "instances": written["train"],
        "panoptic": written["panoptic_train"],
        "pngs": written["panoptic_train"].with_suffix(""),
    }


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def tight_box(mask: torch.Tensor) -> list[int]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def pixel_boxes(target: dict) -> torch.Tensor:
    """The target's normalised cx, cy, w, h boxes as x1, y1, x2, y2 pixels."""
    height, width = target["size"].tolist()
    cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


# --- Instance masks -----------------------------------------------------------------------------


def test_instance_masks_are_the_scenes_exact_masks(digits):
    dataset = CocoDetection(digits["images"], digits["instances"], masks=True)
    assert dataset.is_thing == [True] * 10
    for index in range(NUM_IMAGES):
        _, target = dataset[index]
        scene = make_scene("train", index)
        assert target["masks"].dtype == torch.bool
        assert np.array_equal(target["masks"].numpy(), scene.masks)
        assert len(target["masks"]) == len(target["boxes"]) == len(target["labels"])
    assert "masks" not in CocoDetection(digits["images"], digits["instances"])[0][1]


def rle_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed RLE counts of a mask: runs of 0s and 1s, column by column, from a 0s run."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def test_polygons_and_both_rles_give_the_same_masks(tmp_path):
    height, width = 24, 32
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(tmp_path / "a.png")
    polygons = [[2, 3, 20, 4, 11, 18], [22, 2, 30, 2, 30, 10, 22, 10]]  # a triangle, a square
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    compressed = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
    forms = [
        polygons,
        {"size": [height, width], "counts": rle_runs(mask)},
        {"size": [height, width], "counts": compressed},
    ]
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 28, 16], "area": 100}
        | {"iscrowd": 0, "segmentation": form}
        for i, form in enumerate(forms)
    ]
    path = save(
        tmp_path / "a.json",
        {
            "images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "shape"}],
        },
    )
    assert check_dataset(tmp_path, path, masks=True).problems == {}
    masks = CocoDetection(tmp_path, path, masks=True)[0][1]["masks"]
    assert masks.shape == (3, height, width) and mask.sum() > 100
    for decoded in masks:
        assert np.array_equal(decoded.numpy(), mask.astype(bool))


def test_masks_move_with_the_boxes_through_the_augmentations(digits):
    """Masks are resized by nearest sampling (torch's: output pixel j takes source pixel
    floor(j * in / out)), boxes exactly: each resize can put a mask's edge up to a pixel outside
    its box (less than 1 + the earlier error times the scale: under 2 px for the two resizes of
    the crop branch at shrinking sizes), and shrinking can skip a thin edge of a mask."""
    # Sizes that only shrink the 128-256 pixel scenes (enlarging multiplies earlier errors).
    config = AugmentationConfig(
        scales=(96, 112),
        max_size=400,
        crop_resize_sizes=(128,),
        crop_min_size=110,
        crop_max_size=128,
    )
    # A flip and one resize: each mask's tight box is its box, within 2 px.
    resize = v2.Compose([v2.RandomHorizontalFlip(0.5), RandomShortSideResize(config.scales)])
    # With the crops, which can cut a digit (box and mask clipped alike, a cut digit need not
    # fill its clipped box): the mask inside its box, within 2 px.
    train = make_train_transforms(config)
    torch.manual_seed(0)
    for transforms, exact in ((resize, True), (train, False)):
        dataset = CocoDetection(digits["images"], digits["instances"], transforms, masks=True)
        for _ in range(4):
            for index in range(NUM_IMAGES):
                image, target = dataset[index]
                masks, boxes = target["masks"], pixel_boxes(target)
                assert masks.shape[1:] == image.shape[1:] and len(masks) == len(boxes)
                for mask, box in zip(masks, boxes):
                    assert mask.any()
                    tight = torch.tensor(tight_box(mask), dtype=torch.float32)
                    outside = torch.cat([box[:2] - tight[:2], tight[2:] - box[2:]])
                    assert (outside < (1 if exact else 2)).all(), (tight, box)
                    if exact:
                        assert torch.allclose(tight, box, atol=2), (tight, box)


def instance_set(digits, tmp_path: Path, change) -> Path:
    """The digits' instances file with ``change(data)`` applied, written beside it."""
    data = load(digits["instances"])
    change(data)
    return save(tmp_path / "changed.json", data)


def set_segmentation(segmentation):
    def change(data):
        data["annotations"][1]["segmentation"] = segmentation

    return change


BROKEN_SEGMENTATIONS = [
    ([[1, 2, 3, 4, 5, 6, 7]], "malformed_polygon", "7 coordinates, an odd number"),
    ([[1, 2, 3, 4]], "malformed_polygon", "2 points; a polygon needs at least 3"),
    ([[1, 2, "3", 4, 5, 6]], "malformed_polygon", 'segmentation[0][2] is "3"'),
    ([], "malformed_polygon", "no polygon"),
    ([5, 6, 7, 8, 9, 10], "malformed_polygon", "segmentation[0] is 5"),
    ("1 2 3", "malformed_segmentation", "expected polygons"),
    ({"size": "240x180", "counts": "0"}, "malformed_rle", "expected [height, width]"),
    ({"size": [10, 10], "counts": [100]}, "segmentation_size_mismatch", "RLE size [10, 10]"),
    ({"counts": [1]}, "malformed_rle", "RLE size null"),
]


@pytest.mark.parametrize(("segmentation", "kind", "message"), BROKEN_SEGMENTATIONS)
def test_broken_segmentations(digits, tmp_path, segmentation, kind, message):
    path = instance_set(digits, tmp_path, set_segmentation(segmentation))
    with pytest.raises(CocoFormatError, match=r"changed.json: annotations\[1\] \(id 2"):
        CocoDetection(digits["images"], path, masks=True)
    with pytest.raises(CocoFormatError, match=message.replace("[", "\\[")):
        CocoDetection(digits["images"], path, masks=True)
    report = check_dataset(digits["images"], path, masks=True)
    assert set(report.problems) == {kind} and report.exit_code == 1
    assert "(id 2, image id 1)" in report.problems[kind].examples[0]
    # Box training never reads the masks: a warning, and the loader takes the file.
    report = check_dataset(digits["images"], path)
    assert report.problems[kind].severity == "warning" and report.exit_code == 0
    assert "--masks" in report.format()
    assert len(CocoDetection(digits["images"], path)) == NUM_IMAGES


def test_rles_that_do_not_decode(digits, tmp_path):
    height, width = make_scene("train", 0).image.shape[:2]
    size = [height, width]
    cases = {
        "cover 3 pixels": {"size": size, "counts": [1, 2]},
        "expected non-negative integers": {"size": size, "counts": [height * width + 1, -1]},
        "outside '0'..'o'": {"size": size, "counts": "0~~"},
        "ends inside a number": {"size": size, "counts": "1o"},
        "counts 3; expected a list": {"size": size, "counts": 3},
    }
    data = load(digits["instances"])
    for message, rle in cases.items():
        data["annotations"][0]["segmentation"] = rle
        path = save(tmp_path / "rle.json", data)
        with pytest.raises(CocoFormatError, match=f"rle.json: annotations\\[0\\].*{message}"):
            CocoDetection(digits["images"], path, masks=True)
        assert set(check_dataset(digits["images"], path, masks=True).problems) == {"malformed_rle"}


def test_missing_segmentation_is_an_error_only_for_masks(digits, tmp_path):
    def drop(data):
        del data["annotations"][2]["segmentation"]

    path = instance_set(digits, tmp_path, drop)
    with pytest.raises(CocoFormatError, match=r"changed.json: annotations\[2\] \(id 3.*has no"):
        CocoDetection(digits["images"], path, masks=True)
    assert set(check_dataset(digits["images"], path, masks=True).problems) == {
        "missing_segmentation"
    }
    assert check_dataset(digits["images"], path).problems == {}
    CocoDetection(digits["images"], path)


def test_image_file_of_another_size_than_the_json(digits, tmp_path):
    def grow(data):
        data["images"][0]["height"] += 1
        for annotation in data["annotations"]:
            if annotation["image_id"] == 1:  # polygons fit any size: the file's is compared
                annotation["segmentation"] = [[1, 1, 5, 1, 5, 5]]

    path = instance_set(digits, tmp_path, grow)
    dataset = CocoDetection(digits["images"], path, masks=True)
    with pytest.raises(CocoFormatError, match=r"changed.json: image .*000001.png is .*JSON says"):
        dataset[0]
    report = check_dataset(digits["images"], path, masks=True)
    assert report.problems["image_size_mismatch"].severity == "error" and not report.ok
    report = check_dataset(digits["images"], path)
    assert report.problems["image_size_mismatch"].severity == "warning" and report.ok


# --- The panoptic format ------------------------------------------------------------------------


def test_coco_panoptic_equals_the_digits_panoptic_dataset(digits):
    coco = CocoPanoptic(digits["images"], digits["panoptic"])
    generated = DigitsDetection("train", NUM_IMAGES, panoptic=True)
    assert coco.panoptic_dir == digits["pngs"]
    assert (coco.class_names, coco.is_thing) == (generated.class_names, generated.is_thing)
    assert pq_categories(coco) == pq_categories(generated) == (set(range(10)), {10})
    for index in range(NUM_IMAGES):
        coco_image, coco_target = coco[index]
        image, target = generated[index]
        assert torch.equal(coco_image, image)
        assert coco_target.keys() == target.keys() | {"skipped"}
        for name, value in target.items():
            assert torch.equal(coco_target[name], value), name
        assert torch.equal(coco.panoptic_target(index), generated.panoptic_target(index))
        panoptic = generated.panoptic_target(index)
        assert panoptic.shape == (*image.shape[1:], 2) and panoptic.dtype == torch.int64
        assert (panoptic[..., 0] != VOID).all()  # a scene has no void


def test_crowd_segments_are_void_and_torchmetrics_scores_void_as_void(digits):
    data = load(digits["panoptic"])
    crowd = data["annotations"][0]["segments_info"][0]
    crowd["iscrowd"] = 1
    save(digits["panoptic"], data)
    dataset = CocoPanoptic(digits["images"], digits["panoptic"])
    full = DigitsDetection("train", NUM_IMAGES, panoptic=True)[0][1]
    target = dataset[0][1]
    assert torch.equal(target["labels"], full["labels"][1:])
    assert torch.equal(target["masks"], full["masks"][1:])
    panoptic = dataset.panoptic_target(0)
    void = panoptic[..., 0] == VOID
    ids = read_segment_ids(digits["pngs"] / data["annotations"][0]["file_name"])
    assert torch.equal(void, ids == crowd["id"]) and (panoptic[void][:, 1] == 0).all()

    detection = pytest.importorskip("torchmetrics.detection")
    things, stuffs = pq_categories(dataset)
    metric = detection.PanopticQuality(things, stuffs, allow_unknown_preds_category=True)
    # A prediction that also covers the void with a segment of its own is not penalised.
    prediction = panoptic.clone()
    prediction[void] = torch.tensor([crowd["category_id"], 99])
    metric.update(prediction[None], panoptic[None])
    assert metric.compute().item() == pytest.approx(1.0)


def panoptic_set(digits, change) -> Path:
    data = load(digits["panoptic"])
    change(data)
    return save(digits["panoptic"], data)


def expect_panoptic(digits, kind: str, severity: str = "error") -> None:
    report = check_panoptic(digits["images"], digits["panoptic"])
    assert set(report.problems) == {kind}, report.format()
    assert report.problems[kind].severity == severity
    assert report.exit_code == (1 if severity == "error" else 0)


def test_panoptic_png_missing(digits):
    (digits["pngs"] / "000002.png").unlink()
    expect_panoptic(digits, "missing_panoptic_png")
    with pytest.raises(ImageReadError, match=r"panoptic_train: 1 of the 2 PNGs.*000002.png"):
        CocoPanoptic(digits["images"], digits["panoptic"])
    report = check_panoptic(digits["images"], digits["panoptic"], digits["images"].parent)
    assert report.problems["missing_panoptic_png"].count == 2
    with pytest.raises(ImageReadError, match="nowhere: no such folder"):
        CocoPanoptic(digits["images"], digits["panoptic"], digits["pngs"] / "nowhere")


def test_panoptic_png_unreadable_or_of_another_size(digits):
    png = digits["pngs"] / "000001.png"
    ids = read_segment_ids(png).numpy()
    Image.fromarray(panoptic_png(ids[:-1])).save(png)  # a row short
    expect_panoptic(digits, "panoptic_size_mismatch")
    dataset = CocoPanoptic(digits["images"], digits["panoptic"])
    with pytest.raises(CocoFormatError, match=r"panoptic_train.json: PNG .*000001.png is .*image"):
        dataset[0]
    png.write_bytes(b"not a png")
    expect_panoptic(digits, "unreadable_panoptic_png")
    with pytest.raises(ImageReadError, match=r"000001\.png"):
        dataset.panoptic_target(0)


def test_panoptic_ids_missing_from_the_json(digits):
    panoptic_set(digits, lambda data: data["annotations"][1]["segments_info"].pop(0))
    expect_panoptic(digits, "unlisted_segment_id")
    dataset = CocoPanoptic(digits["images"], digits["panoptic"])
    with pytest.raises(CocoFormatError, match=r"000002.png: ids 1 \(1 in all\) are in the PNG"):
        dataset[1]


def test_panoptic_segment_without_pixels_is_left_out(digits):
    def add(data):
        data["annotations"][0]["segments_info"].append({"id": 999, "category_id": 3})

    panoptic_set(digits, add)
    expect_panoptic(digits, "segment_without_pixels", "warning")
    target = CocoPanoptic(digits["images"], digits["panoptic"])[0][1]
    assert torch.equal(target["labels"], DigitsDetection("train", 1, panoptic=True)[0][1]["labels"])


@pytest.mark.parametrize(
    ("change", "kind", "message"),
    [
        (
            lambda data: data["annotations"][0]["segments_info"][0].update(category_id=42),
            "unknown_category_id",
            "segments_info\\[0\\] has category_id 42",
        ),
        (
            lambda data: data["annotations"][0]["segments_info"][1].update(id=1),
            "duplicate_segment_id",
            "segments_info\\[1\\] has id 1, like segments_info\\[0\\]",
        ),
        (
            lambda data: data["annotations"][0]["segments_info"][0].pop("category_id"),
            "malformed_panoptic_annotation",
            "has no 'category_id'",
        ),
        (
            lambda data: data["annotations"][0]["segments_info"][0].update(id=0),
            "malformed_panoptic_annotation",
            "has id 0; expected an integer in 1..",
        ),
        (
            lambda data: data["annotations"].append(dict(data["annotations"][0])),
            "duplicate_panoptic_annotation",
            "image id 1 has annotations\\[0\\] already",
        ),
        (
            lambda data: data["annotations"][1].update(file_name="../x.png"),
            "unsafe_file_name",
            "leads outside the PNG folder",
        ),
        (
            lambda data: data["categories"][0].pop("isthing"),
            "malformed_category",
            "categories\\[0\\] has no 'isthing'",
        ),
        (
            lambda data: data["annotations"][1].update(image_id=7),
            "unknown_image_id",
            "has image_id 7, which no image has",
        ),
    ],
)
def test_panoptic_json_errors(digits, change, kind, message):
    panoptic_set(digits, change)
    report = check_panoptic(digits["images"], digits["panoptic"])
    assert kind in report.problems and report.problems[kind].severity == "error"
    assert report.exit_code == 1
    with pytest.raises(CocoFormatError, match=f"panoptic_train.json: .*{message}"):
        CocoPanoptic(digits["images"], digits["panoptic"])


def test_images_without_a_panoptic_annotation_are_left_out(digits):
    panoptic_set(digits, lambda data: data["annotations"].pop(0))
    report = check_panoptic(digits["images"], digits["panoptic"])
    assert set(report.problems) == {"missing_panoptic_annotation"} and report.ok
    assert report.problems["missing_panoptic_annotation"].examples == ["000001.png (image id 1)"]
    with pytest.warns(UserWarning, match="1 images without a panoptic annotation"):
        dataset = CocoPanoptic(digits["images"], digits["panoptic"])
    assert dataset.image_ids == [2] and len(dataset) == 1


# --- The command line ---------------------------------------------------------------------------


def test_cli_check_masks_and_panoptic(digits, tmp_path, capsys):
    images, instances, panoptic = (str(digits[k]) for k in ("images", "instances", "panoptic"))
    assert main(["data", "check", images, instances, "--masks", "--panoptic", panoptic]) == 0
    out = capsys.readouterr().out
    assert out.count("OK: usable") == 2 and "PNGs:" in out and "segments" in out
    assert main(["data", "check", images, "--panoptic", panoptic]) == 0
    capsys.readouterr()

    bad = str(instance_set(digits, tmp_path, set_segmentation([[1, 2, 3]])))
    assert main(["data", "check", images, bad]) == 0  # boxes only: a warning
    assert main(["data", "check", images, bad, "--masks"]) == 1
    assert "[malformed_polygon]" in capsys.readouterr().out
    (digits["pngs"] / "000001.png").unlink()
    assert main(["data", "check", images, instances, "--panoptic", panoptic]) == 1
    assert "missing_panoptic_png" in capsys.readouterr().out

    assert main(["data", "check", images]) == 2
    error = capsys.readouterr().err
    assert error.startswith("detrkit: error:") and error.count("\n") == 1
    assert main(["data", "check", images, instances, "--panoptic-dir", images]) == 2
    assert "--panoptic-dir" in capsys.readouterr().err


def test_loader_errors_are_one_line_in_the_cli(digits, tmp_path, capsys):
    """The loaders' errors are ValueErrors and OSErrors, which the CLI prints as one line."""
    bad = instance_set(digits, tmp_path, set_segmentation([[1, 2, 3]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for error_type, make in (
            (CocoFormatError, lambda: CocoDetection(digits["images"], bad, masks=True)),
            (ImageReadError, lambda: CocoPanoptic(digits["images"], digits["panoptic"], bad)),
        ):
            with pytest.raises(error_type) as caught:
                make()
            assert isinstance(caught.value, (ValueError, OSError))
            assert "\n" not in str(caught.value) and str(bad.name) in str(caught.value)

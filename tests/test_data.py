"""COCO-format loading, augmentations and batching, checked against hand-computed values."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.data import (
    AugmentationConfig,
    CocoDetection,
    ImageReadError,
    RandomShortSideResize,
    RandomSizeCrop,
    collate_fn,
    make_train_transforms,
    make_val_transforms,
    read_image,
    resized_shape,
    to_training_sample,
)
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, instance_fields

HEIGHT, WIDTH = 60, 80  # every test image


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def write_images(directory: Path) -> dict[str, np.ndarray]:
    """One image per colour mode; returns the RGB each should decode to."""
    rgb = pixels(0)
    Image.fromarray(rgb).save(directory / "rgb.jpg", quality=95)
    grey = pixels(1)[:, :, 0]
    Image.fromarray(grey).save(directory / "grey.png")
    rgba = np.dstack([pixels(2), pixels(3)[:, :, 0]])
    Image.fromarray(rgba).save(directory / "rgba.png")
    Image.fromarray(pixels(4)).convert("P").save(directory / "palette.png")
    Image.fromarray(pixels(5)).convert("CMYK").save(directory / "cmyk.jpg")
    grey16 = pixels(6)[:, :, 0]
    Image.fromarray(grey16.astype(np.uint16) * 257).save(directory / "deep.png")  # 16-bit
    Image.fromarray(pixels(7)).save(directory / "plain.bmp")  # Pillow decodes this one
    with Image.open(directory / "rgb.jpg") as pil:
        decoded_rgb = np.asarray(pil.convert("RGB"))
    with Image.open(directory / "palette.png") as pil:
        palette_rgb = np.asarray(pil.convert("RGB"))
    with Image.open(directory / "cmyk.jpg") as pil:
        cmyk_rgb = np.asarray(pil.convert("RGB"))
    return {
        "rgb.jpg": decoded_rgb,
        "grey.png": np.repeat(grey[:, :, None], 3, axis=2),
        "rgba.png": rgba[:, :, :3],
        "palette.png": palette_rgb,
        "cmyk.jpg": cmyk_rgb,
        "deep.png": np.repeat(grey16[:, :, None], 3, axis=2),
        "plain.bmp": pixels(7),
    }


CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "cat"}]


def annotation(ann_id: int, image_id: int, category_id: int, bbox: list[float], **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": extra.pop("area", bbox[2] * bbox[3]),
        "iscrowd": extra.pop("iscrowd", 0),
    }


@pytest.fixture
def coco_dir(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    expected = write_images(images_dir)
    names = list(expected)
    images = [
        {"id": 10 + i, "file_name": name, "height": HEIGHT, "width": WIDTH}
        for i, name in enumerate(names)
    ]
    annotations = [
        annotation(1, 10, 3, [10, 5, 20, 30], area=321.5),  # kept as is
        annotation(2, 10, 3, [0, 0, 40, 40], iscrowd=1),  # crowd: left out
        annotation(3, 10, 1, [30, 30, 0, 10]),  # zero width: dropped
        annotation(4, 10, 7, [70, 50, 20, 20]),  # clipped to [70, 50, 80, 60]
        annotation(5, 10, 1, [-5, 10, 10, 10]),  # clipped to [0, 10, 5, 20]
        annotation(6, 10, 7, [90, 10, 5, 5]),  # wholly outside: empty after clipping
    ]
    annotations += [annotation(100 + i, 11 + i, 1, [1, 2, 3, 4]) for i in range(len(names) - 1)]
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return images_dir, path, expected


# --- loading -----------------------------------------------------------------------------------


def load(images_dir: Path, path: Path, **kwargs) -> CocoDetection:
    """The coco_dir dataset, which says once what it leaves out."""
    left_out = r"1 crowd annotations, 1 boxes of zero size, 1 boxes wholly outside"
    with pytest.warns(UserWarning, match=left_out):
        return CocoDetection(images_dir, path, **kwargs)


def test_targets_match_hand_computed_values(coco_dir):
    images_dir, path, _ = coco_dir
    dataset = load(images_dir, path)
    assert len(dataset) == 7
    assert dataset.category_ids == [1, 3, 7]
    assert dataset.class_names == ["person", "cat", "dog"]
    assert dataset.num_classes == 3

    image, target = dataset[0]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8
    xyxy = torch.tensor([[10, 5, 30, 35], [70, 50, 80, 60], [0, 10, 5, 20]], dtype=torch.float32)
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    expected = cxcywh / torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 2, 0]  # cat, dog, person
    assert target["area"].tolist() == [321.5, 400.0, 100.0]
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert int(target["image_id"]) == 10
    assert target["orig_size"].tolist() == [HEIGHT, WIDTH]
    assert target["size"].tolist() == [HEIGHT, WIDTH]
    assert dataset.labels_to_category_ids(target["labels"]).tolist() == [3, 7, 1]


def test_coco_label_mapping_uses_category_ids(coco_dir):
    images_dir, path, _ = coco_dir
    dataset = load(images_dir, path, label_mapping="coco")
    assert dataset.num_classes == 8
    assert dataset.class_names[1] == "person" and dataset.class_names[7] == "dog"
    assert dataset.class_names[2] == "N/A"
    assert dataset[0][1]["labels"].tolist() == [3, 7, 1]
    assert dataset.labels_to_category_ids(torch.tensor([3, 7])).tolist() == [3, 7]
    with pytest.raises(ValueError, match="labels must be in"):
        dataset.labels_to_category_ids([8])
    with pytest.raises(ValueError, match="label_mapping"):
        CocoDetection(images_dir, path, label_mapping="sorted")


@pytest.mark.parametrize(
    "name", ["rgb.jpg", "grey.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png", "plain.bmp"]
)
def test_every_colour_mode_decodes_to_rgb(coco_dir, name):
    images_dir, _, expected = coco_dir
    image = read_image(images_dir / name)
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8
    difference = (image.permute(1, 2, 0).int() - torch.tensor(expected[name]).int()).abs()
    assert int(difference.max()) <= (2 if name == "cmyk.jpg" else 0)


def test_every_colour_mode_loads_through_the_dataset(coco_dir):
    images_dir, path, _ = coco_dir
    dataset = load(images_dir, path)
    for index in range(1, len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8
        torch.testing.assert_close(
            target["boxes"], torch.tensor([[2.5 / WIDTH, 4 / HEIGHT, 3 / WIDTH, 4 / HEIGHT]])
        )


def test_malformed_annotation_files_name_the_file_and_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        CocoDetection(tmp_path, broken)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"partial\.json.*missing 'categories'"):
        CocoDetection(tmp_path, partial)
    bad_box = tmp_path / "bad_box.json"
    bad_box.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                "annotations": [annotation(1, 1, 1, [1, 2, 3, 4]) | {"bbox": [1, 2, 3]}],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    with pytest.raises(
        ValueError, match=r"bad_box\.json: annotations\[0\] has bbox \[1, 2, 3\]; expected \["
    ):
        CocoDetection(tmp_path, bad_box)


def test_unreadable_images_are_skipped_or_raise(coco_dir):
    images_dir, path, _ = coco_dir
    data = (images_dir / "rgb.jpg").read_bytes()
    (images_dir / "rgb.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (images_dir / "plain.bmp").unlink()  # missing (the last item)

    dataset = load(images_dir, path)
    with pytest.warns(UserWarning, match=r"rgb\.jpg"):
        _, target = dataset[0]
    assert int(target["image_id"]) == 11  # the next item
    assert int(target["skipped"]) == 1 and int(dataset[1][1]["skipped"]) == 0
    assert dataset.skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known unreadable file is skipped silently
        assert int(dataset[0][1]["image_id"]) == 11
    with pytest.warns(UserWarning, match=r"plain\.bmp"):
        assert int(dataset[6][1]["image_id"]) == 11  # wraps around, past the truncated one
    assert dataset.skipped == 2

    # Strict (as evaluation reads): a missing file is found at once, an undecodable one when read.
    with pytest.raises(ImageReadError, match=r"1 of the 7 images .* not there, e.g. plain\.bmp"):
        load(images_dir, path, strict=True)
    (images_dir / "plain.bmp").write_bytes(b"")
    strict = load(images_dir, path, strict=True)
    with pytest.raises(ImageReadError, match=r"rgb\.jpg"):
        strict[0]
    with pytest.raises(ImageReadError, match=r"plain\.bmp"):
        strict[6]


def test_adjacent_unreadable_images_are_counted_once_each(coco_dir):
    """The training log sums the targets' ``skipped`` over an epoch: with two unreadable files
    side by side, that sum must be 2, not 3 (index 0 stepping over both, index 1 over one)."""
    images_dir, path, _ = coco_dir
    (images_dir / "rgb.jpg").write_bytes(b"not an image")  # image id 10, index 0
    (images_dir / "grey.png").unlink()  # image id 11, index 1
    dataset = load(images_dir, path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_fn)
    for epoch in range(2):  # known unreadable files count again in every epoch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            targets = [target for _, _, batch in loader for target in batch]
        assert sum(int(target["skipped"]) for target in targets) == 2
        assert [int(t["image_id"]) for t in targets] == [12, 12, 12, 13, 14, 15, 16]
        warned = [str(w.message) for w in caught if "unreadable" in str(w.message)]
        assert len(warned) == (2 if epoch == 0 else 0)
    assert dataset.skipped == 2


# --- augmentations -----------------------------------------------------------------------------


def sample(boxes: list[list[float]], height: int = HEIGHT, width: int = WIDTH):
    count = len(boxes)
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(height, width),
        ),
        "labels": torch.arange(count),
        "area": torch.arange(count, dtype=torch.float32) * 10,
        "iscrowd": torch.zeros(count, dtype=torch.int64),
    }
    return image, target


def pixel_boxes(target: dict) -> torch.Tensor:
    """Normalised cxcywh back to pixel xyxy."""
    height, width = target["size"].tolist()
    cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def test_flip_moves_boxes_as_computed_by_hand(coco_dir):
    images_dir, path, _ = coco_dir
    dataset = load(images_dir, path, transforms=v2.RandomHorizontalFlip(p=1.0))
    plain = load(images_dir, path)
    image, target = dataset[0]
    # x -> 80 - x: [10, 5, 30, 35] -> [50, 5, 70, 35] and so on.
    expected = torch.tensor(
        [[50, 5, 70, 35], [0, 50, 10, 60], [75, 10, 80, 20]], dtype=torch.float32
    )
    torch.testing.assert_close(pixel_boxes(target), expected)
    torch.testing.assert_close(image, plain[0][0].flip(-1))


class FixedCrop(RandomSizeCrop):
    """RandomSizeCrop with its random draw replaced by a fixed region."""

    def __init__(self, top: int, left: int, height: int, width: int) -> None:
        super().__init__(1, 1000)
        self.region = {"top": top, "left": left, "height": height, "width": width}

    def make_params(self, flat_inputs):
        return dict(self.region)


def test_crop_clips_and_drops_boxes_as_computed_by_hand():
    image, target = sample([[10, 5, 30, 35], [70, 50, 80, 60], [0, 10, 5, 20], [20, 20, 60, 50]])
    transforms = v2.Compose(
        [
            FixedCrop(top=8, left=15, height=40, width=50),
            v2.SanitizeBoundingBoxes(labels_getter=instance_fields),
        ]
    )
    image, target = to_training_sample(image, target, transforms)
    assert image.shape == (3, 40, 50)
    # Shift by (-15, -8), clip to 50 x 40; the 2nd and 3rd boxes end up empty and go.
    torch.testing.assert_close(
        pixel_boxes(target), torch.tensor([[0, 0, 15, 27], [5, 12, 45, 40]], dtype=torch.float32)
    )
    assert target["labels"].tolist() == [0, 3]
    assert target["area"].tolist() == [0.0, 30.0]
    assert target["iscrowd"].tolist() == [0, 0]


def test_random_size_crop_draws_within_bounds():
    torch.manual_seed(0)
    crop = RandomSizeCrop(30, 50)
    regions = [crop.make_params([sample([])[0]]) for _ in range(300)]
    heights = {r["height"] for r in regions}
    widths = {r["width"] for r in regions}
    assert min(heights) == 30 and max(heights) == 50 and min(widths) == 30 and max(widths) == 50
    assert all(
        r["top"] + r["height"] <= HEIGHT and r["left"] + r["width"] <= WIDTH for r in regions
    )
    # A side shorter than min_size is kept whole.
    narrow = crop.make_params([tv_tensors.Image(torch.zeros(3, 20, 80, dtype=torch.uint8))])
    assert narrow["height"] == 20 and narrow["top"] == 0


@pytest.mark.parametrize(
    ("height", "width", "short_side", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1066)),  # long side 1066.67, truncated
        (375, 500, 800, 1333, (800, 1066)),
        (480, 640, 480, 1333, (480, 640)),  # already at size
        (100, 1000, 800, 1333, (133, 1330)),  # long side bound: short side round(133.3)
        (1000, 300, 800, 1333, (1333, 400)),  # portrait: round(399.9) = 400, 400*1000/300 = 1333.3
        (13, 20, 100, 10, (6, 9)),  # round(6.5) = 6 (round half to even, as Python's round)
        (500, 500, 600, None, (600, 600)),
    ],
)
def test_resized_shape_follows_the_original_rounding(height, width, short_side, max_size, expected):
    assert resized_shape(height, width, short_side, max_size) == expected


def test_resize_scales_boxes():
    image, target = sample([[10, 5, 30, 35]])
    image, target = to_training_sample(image, target, RandomShortSideResize([32]))
    assert target["size"].tolist() == [32, 42]  # int(32 * 80 / 60) = 42
    sx, sy = 42 / 80, 32 / 60
    torch.testing.assert_close(
        pixel_boxes(target), torch.tensor([[10 * sx, 5 * sy, 30 * sx, 35 * sy]])
    )


def test_val_transforms_resize_and_normalise():
    image, target = sample([[10, 5, 30, 35]], height=480, width=640)
    image = tv_tensors.Image(torch.full((3, 480, 640), 200, dtype=torch.uint8))
    image, target = to_training_sample(image, target, make_val_transforms())
    assert image.shape == (3, 800, 1066) and image.dtype == torch.float32
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 400, 500], expected)
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[20 / 640, 20 / 480, 20 / 640, 30 / 480]])
    )


def test_train_transforms_keep_boxes_on_their_objects():
    """A white rectangle on black: after any augmentation its box still encloses it tightly."""
    torch.manual_seed(0)
    transforms = make_train_transforms(AugmentationConfig().scaled(0.1))
    canvas = torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8)
    canvas[:, 10:40, 20:50] = 255
    for _ in range(40):
        image, target = sample([[20, 10, 50, 40]])
        image, target = to_training_sample(tv_tensors.Image(canvas), target, transforms)
        assert image.dtype == torch.float32
        assert max(image.shape[1:]) <= 133
        # Undo the std: black is about -0.45 and white about 0.55; halfway marks the edges.
        white = (image * torch.tensor(IMAGENET_STD)[:, None, None]).mean(0) > 0.05
        rows, cols = white.any(1).nonzero(), white.any(0).nonzero()
        if len(target["boxes"]) == 0:  # cropped out, or under a pixel left
            assert min(len(rows), len(cols)) <= 2
            continue
        x1, y1, x2, y2 = pixel_boxes(target)[0].tolist()
        assert abs(x1 - cols.min()) <= 1.5 and abs(x2 - (cols.max() + 1)) <= 1.5
        assert abs(y1 - rows.min()) <= 1.5 and abs(y2 - (rows.max() + 1)) <= 1.5


def test_augmentation_config_validates_and_scales():
    with pytest.raises(ValueError, match="crop_min_size"):
        AugmentationConfig(crop_min_size=700)
    with pytest.raises(ValueError, match="scales"):
        AugmentationConfig(scales=())
    half = AugmentationConfig().scaled(0.5)
    assert half.scales[0] == 240 and half.max_size == 666 and half.val_size == 400


# --- batching ----------------------------------------------------------------------------------


def test_collate_pads_and_masks():
    first = (torch.ones(3, 4, 6), {"labels": torch.tensor([1])})
    second = (torch.full((3, 5, 3), 2.0), {"labels": torch.tensor([2, 3])})
    images, mask, targets = collate_fn([first, second])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert bool((images[0, :, :4, :6] == 1).all()) and bool((images[0, :, 4:] == 0).all())
    assert bool((images[1, :, :5, :3] == 2).all()) and bool((images[1, :, :, 3:] == 0).all())
    expected = torch.ones(2, 5, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :5, :3] = False
    assert torch.equal(mask, expected)
    assert targets == [first[1], second[1]]


def test_dataloader_batches_the_dataset(coco_dir):
    images_dir, path, _ = coco_dir
    dataset = load(
        images_dir, path, transforms=make_train_transforms(AugmentationConfig().scaled(0.1))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_fn)
    images, mask, targets = next(iter(loader))
    assert images.shape[:2] == (3, 3) and mask.shape == (3, *images.shape[2:])
    assert len(targets) == 3 and all(t["boxes"].shape[1] == 4 for t in targets)

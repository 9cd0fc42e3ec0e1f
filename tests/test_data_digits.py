"""The built-in digits dataset: deterministic, exact boxes, disjoint splits, valid COCO output."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from pycocotools.coco import COCO

from detrkit.data import CocoDetection, DigitsDetection, make_scene, write_digits_coco
from detrkit.data.digits import _digits, digit_indices


def test_same_seed_same_scenes_other_seed_other_scenes():
    for index in range(5):
        first, again = make_scene("train", index, seed=3), make_scene("train", index, seed=3)
        assert np.array_equal(first.image, again.image)
        assert np.array_equal(first.boxes, again.boxes)
        assert np.array_equal(first.labels, again.labels)
    assert not np.array_equal(make_scene("train", 0, seed=3).image, make_scene("train", 0).image)
    image, target = DigitsDetection("val", 4, seed=1)[2]
    image_again, target_again = DigitsDetection("val", 4, seed=1)[2]
    assert torch.equal(image, image_again) and torch.equal(target["boxes"], target_again["boxes"])


def test_boxes_enclose_exactly_the_changed_pixels():
    digit_labels = _digits()[1]
    for index in range(30):
        scene = make_scene("val", index, seed=7)
        height, width = scene.image.shape[:2]
        assert 128 <= height <= 256 and 128 <= width <= 256
        assert 1 <= len(scene.labels) <= 5
        changed = (scene.image != scene.background).any(axis=2)  # [H, W]
        assert np.array_equal(changed, scene.masks.any(axis=0))
        assert scene.masks.sum(axis=0).max() <= 1  # digits do not overlap
        for box, mask in zip(scene.boxes, scene.masks):
            rows, cols = np.nonzero(changed & mask)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert 16 * 0.5 <= box[3] - box[1] <= 64
        assert np.array_equal(scene.labels, digit_labels[scene.sources])


def test_train_and_val_use_disjoint_digits():
    train, val = set(digit_indices("train")), set(digit_indices("val"))
    assert not train & val
    assert len(train) + len(val) == len(_digits()[0]) == 1797
    used_train = {int(s) for i in range(50) for s in make_scene("train", i).sources}
    used_val = {int(s) for i in range(50) for s in make_scene("val", i).sources}
    assert used_train <= train and used_val <= val


def test_written_coco_loads_with_pycocotools_and_coco_detection(tmp_path):
    paths = write_digits_coco(tmp_path, num_train=6, num_val=3, seed=2)
    assert paths["train"] == tmp_path / "annotations" / "instances_train.json"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(paths["val"]))
    assert len(coco.getImgIds()) == 3
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(d) for d in range(10)]
    assert min(coco.getAnnIds()) == 1

    generated = DigitsDetection("train", 6, seed=2)
    loaded = CocoDetection(tmp_path / "train", paths["train"])
    assert loaded.class_names == generated.class_names and loaded.num_classes == 10
    for index in range(6):
        (image, target), (image_loaded, target_loaded) = generated[index], loaded[index]
        assert torch.equal(image, image_loaded)
        torch.testing.assert_close(target["boxes"], target_loaded["boxes"])
        for key in ("labels", "image_id", "area", "size"):
            assert torch.equal(target[key], target_loaded[key].to(target[key].dtype)), key
    data = json.loads(paths["train"].read_text())
    assert data["annotations"][0]["bbox"] == [int(v) for v in data["annotations"][0]["bbox"]]


def test_items_are_drawn_once_and_later_changes_do_not_reach_them(monkeypatch):
    import detrkit.data.digits as digits

    drawn = []
    real = digits.make_scene
    monkeypatch.setattr(digits, "make_scene", lambda *args: drawn.append(args) or real(*args))

    def in_place(image, target):  # a transform that changes what it is given
        image.zero_()
        for value in target.values():
            value.zero_()
        return image, target

    fresh = DigitsDetection("train", 3, seed=5, masks=True)[1]
    dataset = DigitsDetection("train", 3, seed=5, masks=True)
    dataset.transforms = in_place
    changed_image, changed = dataset[1]
    assert not changed_image.any() and not changed["boxes"].any()
    dataset.transforms = None
    image, target = dataset[1]
    assert drawn == [("train", 1, 5)] * 2  # fresh's and dataset's first reads, no more
    assert torch.equal(image, fresh[0])
    assert target.keys() == fresh[1].keys()
    for key, value in fresh[1].items():
        assert torch.equal(target[key], value), key
        assert type(target[key]) is type(value), key

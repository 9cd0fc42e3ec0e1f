"""``check_dataset`` and the ``detrkit data`` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.cli.data import add_data_commands
from detrkit.data import CocoDetection, check_dataset, write_digits_coco
from detrkit.inference.predict import image_ids


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="detrkit")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def save_image(path: Path, height: int = 60, width: int = 80) -> None:
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


def write_json(path: Path, images: list, annotations: list, categories: list) -> Path:
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def box(ann_id, image_id, bbox, category_id=1, iscrowd=0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


def image(image_id: int, file_name: str, height: int = 60, width: int = 80) -> dict:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


@pytest.fixture
def flawed(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset with one of every kind of warning, nothing the loader refuses."""
    images_dir = tmp_path / "images"
    (images_dir / "sub").mkdir(parents=True)
    for name in ("good.png", "bare.png", "sub/nested.png"):
        save_image(images_dir / name)
    save_image(images_dir / "resized.png", height=30)
    save_image(tmp_path / "elsewhere.png")
    (images_dir / "linked.png").symlink_to(tmp_path / "elsewhere.png")
    images = [
        image(1, "good.png"),
        image(2, "bare.png"),  # no annotations
        image(3, "resized.png"),  # the file is 30 high
        image(4, "linked.png"),  # a symlink to outside the folder
        image(5, "sub/nested.png"),  # subfolders are fine
    ]
    annotations = [
        box(1, 1, [10, 10, 20, 20]),
        box(2, 1, [0, 0, 40, 40], iscrowd=1),  # crowd
        box(3, 1, [10, 10, 0, 20]),  # zero width
        box(4, 1, [70, 50, 20, 20]),  # partly outside
        box(5, 1, [100, 10, 5, 5]),  # wholly outside
        box(6, 3, [1, 1, 5, 5]),
        box(7, 4, [1, 1, 5, 5]),
        box(8, 5, [1, 1, 5, 5]),
    ]
    categories = [{"id": 1, "name": "thing"}]
    return images_dir, write_json(tmp_path / "flawed.json", images, annotations, categories)


def test_every_kind_of_warning_is_reported(flawed):
    images_dir, path = flawed
    report = check_dataset(images_dir, path)
    assert (report.num_images, report.num_annotations, report.num_categories) == (5, 8, 1)
    counts = {kind: problem.count for kind, problem in report.problems.items()}
    assert counts == {
        "crowd_annotation": 1,
        "empty_box": 1,
        "box_outside_image": 1,
        "box_off_image": 1,
        "image_without_annotations": 1,
        "image_size_mismatch": 1,
        "image_symlink_outside": 1,
    }
    assert all(problem.severity == "warning" for problem in report.problems.values())
    assert report.ok and report.exit_code == 0
    assert report.problems["image_without_annotations"].examples == ["bare.png (image id 2)"]
    assert "linked.png" in report.problems["image_symlink_outside"].examples[0]
    assert "annotations[4]" in report.problems["box_off_image"].examples[0]
    text = report.format()
    assert "[empty_box] 1 x" in text and "bare.png" in text and text.endswith("warnings")

    # The loader takes the same file, leaving out what the warnings say.
    with pytest.warns(UserWarning, match="1 crowd annotations, 1 boxes of zero size, 1 boxes"):
        dataset = CocoDetection(images_dir, path, skip_unreadable=False)
    boxes = [len(dataset[i][1]["boxes"]) for i in range(len(dataset))]
    assert boxes == [2, 0, 1, 1, 1]  # good.png: the plain and the clipped box


def test_header_only_check_misses_truncation(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")  # noise: the header is a small part
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    images = [image(1, "full.jpg"), image(2, "truncated.jpg")]
    annotations = [box(1, 1, [1, 1, 5, 5]), box(2, 2, [1, 1, 5, 5])]
    path = write_json(tmp_path / "a.json", images, annotations, [{"id": 1, "name": "a"}])
    report = check_dataset(tmp_path, path)
    assert set(report.problems) == {"unreadable_image"} and not report.ok
    assert "truncated.jpg (image id 2)" in report.problems["unreadable_image"].examples[0]
    assert check_dataset(tmp_path, path, decode_images=False).problems == {}


def test_unusable_datasets_are_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    report = check_dataset(tmp_path, broken)
    assert not report.ok and report.exit_code == 1
    assert "broken.json" in report.problems["invalid_annotations_file"].examples[0]
    assert "UNUSABLE" in report.format()

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"images": [], "categories": []}))
    report = check_dataset(tmp_path, partial)
    assert "'annotations'" in report.problems["invalid_annotations_file"].examples[0]

    categories = [{"id": 1, "name": "thing"}]
    empty = write_json(tmp_path / "empty.json", [], [], categories)
    assert set(check_dataset(tmp_path, empty).problems) == {"no_images"}

    images = [image(1, "gone.png"), image(2, "gone_too.png")]
    annotations = [box(1, 1, [1, 1, 5, 5])]
    all_missing = write_json(tmp_path / "all_missing.json", images, annotations, categories)
    report = check_dataset(tmp_path, all_missing)
    assert report.problems["missing_image_file"].severity == "error"
    assert report.problems["missing_image_file"].count == 2
    report = check_dataset(tmp_path / "nowhere", all_missing)
    assert report.errors == [report.problems["no_images_dir"]]  # not each file again

    save_image(tmp_path / "a.png")
    images = [image(1, "a.png")]
    unlabelled = write_json(tmp_path / "unlabelled.json", images, [], categories)
    report = check_dataset(tmp_path, unlabelled)
    assert report.problems["not_trainable"].severity == "error"
    assert "cannot be trained on" in report.format()
    no_categories = write_json(tmp_path / "no_categories.json", images, annotations, [])
    report = check_dataset(tmp_path, no_categories)
    assert report.problems["no_categories"].severity == "error"


def test_cli_check_exit_codes(tmp_path, flawed, capsys):
    out = tmp_path / "digits"
    write_digits_coco(out, num_train=4, num_val=0)
    clean = check_dataset(out / "train", out / "annotations" / "instances_train.json")
    assert clean.problems == {} and clean.ok
    assert (
        run_cli("data", "check", str(out / "train"), str(out / "annotations/instances_train.json"))
        == 0
    )
    assert "OK" in capsys.readouterr().out

    images_dir, path = flawed
    assert run_cli("data", "check", str(images_dir), str(path)) == 0  # warnings only
    assert "crowd_annotation" in capsys.readouterr().out
    assert run_cli("data", "check", str(images_dir), str(tmp_path / "nowhere.json")) == 1
    assert "nowhere.json" in capsys.readouterr().out


def test_cli_make_digits(tmp_path, capsys):
    out = tmp_path / "digits"
    assert (
        run_cli("data", "make-digits", str(out), "--train", "3", "--val", "2", "--seed", "5") == 0
    )
    assert len(list((out / "train").glob("*.png"))) == 3
    assert len(list((out / "val").glob("*.png"))) == 2
    assert (out / "annotations" / "instances_val.json").is_file()
    # `detrkit predict` reads an image id off a numeric file name: it must be the file's id.
    listed = json.loads((out / "annotations" / "instances_val.json").read_text())["images"]
    files = [out / "val" / image["file_name"] for image in listed]
    assert image_ids(files) == [image["id"] for image in listed] == [1, 2]
    assert "wrote 3 train images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli("data", "make-digits", str(out), "--train", "-1", "--val", "2")

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


def box(ann_id, image_id, bbox, category_id=1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}


@pytest.fixture
def flawed(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset with one of every kind of problem, none fatal."""
    for name in ("good.png", "bare.png", "other.png"):
        save_image(tmp_path / name)
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")  # noise: the header is a small part
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    save_image(tmp_path / "resized.png", height=30)
    images = [
        {"id": 1, "file_name": "good.png", "height": 60, "width": 80},
        {"id": 2, "file_name": "missing.png"},
        {"id": 3, "file_name": "truncated.jpg"},
        {"id": 4, "file_name": "bare.png"},  # no annotations
        {"id": 1, "file_name": "other.png"},  # repeated id
        {"id": 5},  # no file name
        {"id": 6, "file_name": "resized.png", "height": 60, "width": 80},
    ]
    annotations = [
        box(1, 1, [10, 10, 20, 20]),
        box(1, 1, [12, 10, 20, 20]),  # repeated id
        box(2, 99, [10, 10, 20, 20]),  # unknown image
        box(3, 1, [10, 10, 20, 20], category_id=42),  # unknown category
        box(4, 1, [10, 10, 0, 20]),  # zero width
        box(5, 1, [10, 10, 20, -3]),  # negative height
        box(6, 1, [70, 50, 20, 20]),  # partly outside
        box(7, 1, [100, 10, 5, 5]),  # wholly outside
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},  # no id
        box(9, 6, [1, 1, 5, 5]),
    ]
    categories = [{"id": 1, "name": "thing"}]
    return tmp_path, write_json(tmp_path / "flawed.json", images, annotations, categories)


def test_every_kind_of_problem_is_reported(flawed):
    images_dir, path = flawed
    report = check_dataset(images_dir, path)
    assert (report.num_images, report.num_annotations, report.num_categories) == (7, 10, 1)
    counts = {kind: problem.count for kind, problem in report.problems.items()}
    assert counts == {
        "duplicate_image_id": 1,
        "malformed_image": 1,
        "missing_image_file": 1,
        "unreadable_image": 1,
        "image_size_mismatch": 1,
        "duplicate_annotation_id": 1,
        "unknown_image_id": 1,
        "unknown_category_id": 1,
        "empty_box": 2,
        "box_outside_image": 2,
        "annotation_without_id": 1,
        "image_without_annotations": 3,  # bare.png, plus the missing and the truncated ones
    }
    assert all(problem.severity == "warning" for problem in report.problems.values())
    assert report.ok and report.exit_code == 0
    examples = report.problems["missing_image_file"].examples
    assert examples == ["missing.png (image id 2)"]
    assert "truncated.jpg" in report.problems["unreadable_image"].examples[0]
    assert "wholly outside" in report.problems["box_outside_image"].examples[1]
    text = report.format()
    assert "[empty_box] 2 x" in text and "missing.png" in text and text.endswith("warnings")


def test_header_only_check_misses_truncation(flawed):
    images_dir, path = flawed
    report = check_dataset(images_dir, path, decode_images=False)
    assert "unreadable_image" not in report.problems
    assert report.problems["missing_image_file"].count == 1


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

    images = [{"id": 1, "file_name": "gone.png"}, {"id": 2, "file_name": "gone_too.png"}]
    annotations = [box(1, 1, [1, 1, 5, 5])]
    all_missing = write_json(tmp_path / "all_missing.json", images, annotations, categories)
    report = check_dataset(tmp_path, all_missing)
    assert report.problems["no_readable_images"].severity == "error"
    assert report.problems["missing_image_file"].count == 2

    save_image(tmp_path / "a.png")
    images = [{"id": 1, "file_name": "a.png"}]
    unlabelled = write_json(tmp_path / "unlabelled.json", images, [], categories)
    assert check_dataset(tmp_path, unlabelled).problems["no_annotations"].severity == "error"
    no_categories = write_json(tmp_path / "no_categories.json", images, annotations, [])
    report = check_dataset(tmp_path, no_categories)
    assert report.problems["no_categories"].severity == "error"

    # A box that is not 4 finite numbers: the loader refuses the file, so the check does too.
    for bbox in ([1, 2, 3], [1, 2, float("nan"), 4], [1, True, 3, 4]):
        malformed = [box(1, 1, [1, 1, 5, 5]), box(2, 1, bbox)]
        path = write_json(tmp_path / "malformed.json", images, malformed, categories)
        report = check_dataset(tmp_path, path)
        assert report.problems["malformed_annotation"].severity == "error" and not report.ok
        with pytest.raises(ValueError, match=r"annotations\[1\] has bbox .* 4 finite numbers"):
            CocoDetection(tmp_path, path)


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
    assert "missing_image_file" in capsys.readouterr().out
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

"""Bad COCO datasets, one fault at a time: the loader and ``detrkit data check`` must agree.

Every field the loader reads is made wrong in type, null and missing; every other rule is broken
once. For each case the loader refuses with a ValueError naming the file, the entry and the
field, and ``check_dataset`` calls the dataset unusable, naming the field too. What the loader
leaves out, data check warns about, counted; what training refuses, data check calls an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.cli.data import add_data_commands
from detrkit.data import (
    CocoDetection,
    CocoFormatError,
    ImageReadError,
    check_dataset,
    require_trainable,
)
from detrkit.data.validate import FIELDS, LEFT_OUT
from detrkit.engine.config import TrainConfig
from detrkit.engine.datasets import build_datasets

HEIGHT, WIDTH = 12, 16


def base() -> dict:
    """A valid dataset: two images (one in a subfolder), one box each, two categories."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
            {"id": 2, "file_name": "sub/b.png", "height": HEIGHT, "width": WIDTH},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 5, 4], "area": 20,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [3, 3, 6, 6], "area": 36,
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }  # fmt: skip


def write_dataset(tmp_path: Path, data: object) -> tuple[Path, Path]:
    images_dir = tmp_path / "images"
    (images_dir / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "sub/b.png"):
        if not (images_dir / name).exists():
            Image.fromarray(np.full((HEIGHT, WIDTH, 3), 100, dtype=np.uint8)).save(
                images_dir / name
            )
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return images_dir, path


def entry(section: str, index: int, field: str, value: object) -> Callable[[dict], None]:
    """A change to ``data[section][index][field]``: a value, or ``MISSING`` to delete it."""

    def change(data: dict) -> None:
        if value is MISSING:
            del data[section][index][field]
        else:
            data[section][index][field] = value

    return change


MISSING = object()

# The fields every entry must have, and values of a wrong type (or range) for each.
WRONG = {
    ("images", "id"): ["1", 1.5, True],
    ("images", "file_name"): [7, ["a.png"], ""],
    ("images", "width"): ["16", 0, -16, 16.5],
    ("images", "height"): ["12", 0, True],
    ("categories", "id"): ["1", -1, 1.0],
    ("categories", "name"): [5, ["one"]],
    ("annotations", "id"): ["1", 0, 1.0],
    ("annotations", "image_id"): ["1", 1.5, [1]],
    ("annotations", "category_id"): ["1", -1, False],
    ("annotations", "bbox"): [
        "1,2,5,4",
        [1, 2, 5],
        [1, 2, 5, 4, 0],
        ["1", 2, 5, 4],
        [1, True, 5, 4],
        [1, 2, math.nan, 4],
        [1, 2, math.inf, 4],
        {"x": 1},
    ],
    ("annotations", "area"): ["20", -1, math.nan],
    ("annotations", "iscrowd"): ["0", 2, True],
}


def test_every_field_the_rules_know_is_tested():
    """A field added to the rules without a case here fails this test."""
    known = {(section, field) for section, fields in FIELDS.items() for field in fields}
    assert set(WRONG) == known


def at(where: str, field: str) -> str:
    """The pattern of a message about ``field`` of the entry ``where``, e.g. annotations[0]."""
    return rf"{re.escape(where)} has (no '{field}'|{field} )"


def field_cases() -> list:
    cases = []
    for (section, field), values in WRONG.items():
        for value in [*values, None, MISSING]:
            label = "missing" if value is MISSING else json.dumps(value)
            change = entry(section, 0, field, value)
            cases.append(
                pytest.param(change, at(f"{section}[0]", field), id=f"{section}.{field}={label}")
            )
    return cases


def section(name: str, value: object) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        if value is MISSING:
            del data[name]
        else:
            data[name] = value

    return change


def append(name: str, value: dict) -> Callable[[dict], None]:
    return lambda data: data[name].append(value)


def whole(name: str, index: int, value: object) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data[name][index] = value

    return change


def top(name: str) -> str:
    return rf"(missing '{name}'|'{name}' is )"


def not_object(where: str) -> str:
    return rf"{re.escape(where)} is .*; expected an object"


OTHER_CASES = [
    # The file as a whole.
    pytest.param(section("images", None), top("images"), id="images=null"),
    pytest.param(section("images", {}), top("images"), id="images={}"),
    pytest.param(section("annotations", "x"), top("annotations"), id="annotations=string"),
    pytest.param(section("categories", None), top("categories"), id="categories=null"),
    pytest.param(section("annotations", MISSING), top("annotations"), id="annotations missing"),
    pytest.param(section("images", []), top("images"), id="images empty"),
    pytest.param(section("categories", []), top("categories"), id="categories empty"),
    # Entries that are not objects.
    pytest.param(whole("images", 0, None), not_object("images[0]"), id="images[0]=null"),
    pytest.param(whole("annotations", 1, [1]), not_object("annotations[1]"), id="annotation=[1]"),
    pytest.param(whole("categories", 0, "one"), not_object("categories[0]"), id="category=str"),
    # Repeated ids.
    pytest.param(entry("images", 1, "id", 1), at("images[1]", "id"), id="duplicate image id"),
    pytest.param(
        entry("annotations", 1, "id", 1), at("annotations[1]", "id"), id="duplicate annotation id"
    ),
    pytest.param(
        append("categories", {"id": 2, "name": "again"}),
        at("categories[2]", "id"),
        id="duplicate category id",
    ),
    # References to nothing.
    pytest.param(
        entry("annotations", 1, "image_id", 99), at("annotations[1]", "image_id"), id="no image"
    ),
    pytest.param(
        entry("annotations", 1, "category_id", 9),
        at("annotations[1]", "category_id"),
        id="no category",
    ),
    # Boxes of negative size.
    pytest.param(
        entry("annotations", 1, "bbox", [3, 3, -6, 6]), at("annotations[1]", "bbox"), id="w < 0"
    ),
    pytest.param(
        entry("annotations", 0, "bbox", [3, 3, 6, -1]), at("annotations[0]", "bbox"), id="h < 0"
    ),
    # File names leading outside the images folder.
    *(
        pytest.param(entry("images", 1, "file_name", name), at("images[1]", "file_name"), id=name)
        for name in ("../a.png", "sub/../../a.png", "/etc/passwd", "..\\a.png", "C:/a.png")
    ),
]


ERROR_CASES = [*field_cases(), *OTHER_CASES]


def apply(change: Callable[[dict], None]) -> dict:
    data = base()
    change(data)
    return data


def loader_refusal(images_dir: Path, path: Path) -> Exception | None:
    """Why evaluation or training would refuse the dataset (None: both take it).

    Evaluation builds it with ``skip_unreadable=False`` and reads every image; training also
    needs a usable object. Any other exception type than these escapes and fails the test.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what is left out is checked separately
            dataset = CocoDetection(images_dir, path, skip_unreadable=False)
            for index in range(len(dataset)):
                dataset[index]
            require_trainable(dataset)
    except (ValueError, ImageReadError) as error:
        return error
    return None


@pytest.mark.parametrize(("change", "pattern"), ERROR_CASES)
def test_a_broken_rule_is_refused_by_name_and_reported(tmp_path, change, pattern):
    images_dir, path = write_dataset(tmp_path, apply(change))
    with pytest.raises(CocoFormatError) as caught:
        CocoDetection(images_dir, path)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and re.search(pattern, message), message

    report = check_dataset(images_dir, path)
    assert not report.ok and report.exit_code == 1
    examples = [example for problem in report.errors for example in problem.examples]
    assert any(re.search(pattern, example) for example in examples), examples
    assert loader_refusal(images_dir, path) is not None


def test_the_command_line_names_the_entry_and_field(tmp_path, capsys):
    data = base()
    data["annotations"][1]["bbox"] = None
    data["images"][1]["file_name"] = "../../secret.png"
    images_dir, path = write_dataset(tmp_path, data)
    parser = argparse.ArgumentParser(prog="detrkit")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "check", str(images_dir), str(path)])
    assert args.run(args) == 1
    out = capsys.readouterr().out
    assert "annotations[1] has bbox null; expected [x, y, w, h]" in out
    assert 'images[1] has file_name "../../secret.png"' in out
    assert "UNUSABLE" in out and "Traceback" not in out


# --- what the loader leaves out: warned about by both, counted ------------------------------


def box(bbox: list, iscrowd: int = 0) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data["annotations"].append(
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 1,
             "iscrowd": iscrowd}
        )  # fmt: skip

    return change


# (change, the warning data check gives, whether the loader leaves the box out)
WARNING_CASES = [
    pytest.param(box([1, 1, 2, 2], iscrowd=1), "crowd_annotation", True, id="crowd"),
    pytest.param(box([1, 1, 0, 2]), "empty_box", True, id="zero width"),
    pytest.param(box([1, 1, 2, 0]), "empty_box", True, id="zero height"),
    pytest.param(box([WIDTH, 1, 2, 2]), "box_off_image", True, id="right of the image"),
    pytest.param(box([-5, 1, 5, 2]), "box_off_image", True, id="left of the image"),
    pytest.param(box([1, HEIGHT + 3, 2, 2]), "box_off_image", True, id="below the image"),
    pytest.param(box([WIDTH - 1, 1, 5, 2]), "box_outside_image", False, id="clipped"),
    pytest.param(lambda data: None, None, False, id="clean"),
]


@pytest.mark.parametrize(("change", "kind", "left_out"), WARNING_CASES)
def test_check_warns_about_what_the_loader_leaves_out(tmp_path, change, kind, left_out):
    data = apply(change)
    images_dir, path = write_dataset(tmp_path, data)
    report = check_dataset(images_dir, path)
    assert report.ok
    assert [p.kind for p in report.warnings] == ([kind] if kind else [])
    if kind:
        assert report.problems[kind].count == 1
        assert "annotations[2]" in report.problems[kind].examples[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(images_dir, path)
    kept = sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset)))
    assert kept == len(data["annotations"]) - left_out
    loader_warned = [str(w.message) for w in caught if "left out of the targets" in str(w.message)]
    warned_left_out = sum(p.count for p in report.warnings if p.kind in LEFT_OUT)
    assert warned_left_out == int(left_out) == len(loader_warned)
    if left_out:
        assert str(path) in loader_warned[0]


# --- what training refuses: a set with nothing to learn from ---------------------------------


def annotations(change: Callable[[list], None]) -> Callable[[dict], None]:
    return lambda data: change(data["annotations"])


def all_crowd(items: list) -> None:
    for item in items:
        item["iscrowd"] = 1


def all_empty(items: list) -> None:
    for item in items:
        item["bbox"][2] = 0


UNTRAINABLE_CASES = [
    pytest.param(annotations(list.clear), id="no annotations"),
    pytest.param(annotations(all_crowd), id="all crowd"),
    pytest.param(annotations(all_empty), id="all of zero size"),
]


@pytest.mark.parametrize("change", UNTRAINABLE_CASES)
def test_a_set_with_nothing_to_learn_is_refused_for_training_only(tmp_path, change):
    images_dir, path = write_dataset(tmp_path, apply(change))
    report = check_dataset(images_dir, path)
    assert [p.kind for p in report.errors] == ["not_trainable"]
    assert "cannot be trained on" in report.format()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoDetection(images_dir, path, skip_unreadable=False)  # evaluation takes it
        assert all(len(dataset[i][1]["boxes"]) == 0 for i in range(len(dataset)))
        with pytest.raises(ValueError, match=f"{path}: no (usable object|annotation) to train"):
            require_trainable(dataset)
        config = TrainConfig(data=f"coco:{images_dir},{path},{images_dir},{path}")
        with pytest.raises(ValueError, match=f"{path}: no"):
            build_datasets(config)


def test_a_trainable_set_builds(tmp_path):
    images_dir, path = write_dataset(tmp_path, base())
    config = TrainConfig(data=f"coco:{images_dir},{path},{images_dir},{path}")
    train_set, val_set = build_datasets(config)
    assert len(train_set) == len(val_set) == 2


# --- the image files ------------------------------------------------------------------------


def missing(images_dir: Path) -> None:
    (images_dir / "sub" / "b.png").unlink()


def folder(images_dir: Path) -> None:
    (images_dir / "sub" / "b.png").unlink()
    (images_dir / "sub" / "b.png").mkdir()


def truncated(images_dir: Path) -> None:
    (images_dir / "sub" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def dangling(images_dir: Path) -> None:
    (images_dir / "sub" / "b.png").unlink()
    (images_dir / "sub" / "b.png").symlink_to(images_dir / "nothing.png")


def linked_outside(images_dir: Path) -> None:
    outside = images_dir.parent / "elsewhere.png"
    (images_dir / "sub" / "b.png").rename(outside)
    (images_dir / "sub" / "b.png").symlink_to(outside)


def linked_inside(images_dir: Path) -> None:
    (images_dir / "sub" / "b.png").unlink()
    (images_dir / "sub" / "b.png").symlink_to(images_dir / "a.png")


FILE_CASES = [
    pytest.param(missing, "missing_image_file", id="missing"),
    pytest.param(folder, "image_not_a_file", id="a folder"),
    pytest.param(truncated, "unreadable_image", id="truncated"),
    pytest.param(dangling, "missing_image_file", id="symlink to nothing"),
    pytest.param(linked_outside, "image_symlink_outside", id="symlink outside"),
    pytest.param(linked_inside, None, id="symlink inside"),
]


@pytest.mark.parametrize(("spoil", "kind"), FILE_CASES)
def test_image_files_unusable_to_evaluation_are_errors(tmp_path, spoil, kind):
    images_dir, path = write_dataset(tmp_path, base())
    spoil(images_dir)
    report = check_dataset(images_dir, path)
    assert list(report.problems) == ([kind] if kind else [])
    if kind:
        assert "sub/b.png (image id 2)" in report.problems[kind].examples[0]
    refusal = loader_refusal(images_dir, path)
    assert (refusal is not None) == (not report.ok)
    if refusal is not None:
        assert isinstance(refusal, ImageReadError) and "b.png" in str(refusal)
        # Training skips the file instead, saying so, and reads the other image in its place.
        dataset = CocoDetection(images_dir, path)
        with pytest.warns(UserWarning, match=r"skipping unreadable image .*b\.png"):
            _, target = dataset[1]
        assert int(target["image_id"]) == 1 and int(target["skipped"]) == 1


# --- one truth: check says unusable exactly when the loader (or training) refuses ------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(case.values[0], id=case.id)
        for case in [*ERROR_CASES, *WARNING_CASES, *UNTRAINABLE_CASES]
    ],
)
def test_check_is_unusable_iff_the_loader_refuses(tmp_path, change):
    images_dir, path = write_dataset(tmp_path, apply(change))
    report = check_dataset(images_dir, path)
    assert (not report.ok) == (loader_refusal(images_dir, path) is not None)

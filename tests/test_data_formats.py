"""Pascal VOC and YOLO datasets (``voc:ROOT``, ``yolo:DATA_YAML``): read as the COCO instances
they describe, checked, converted to COCO files, trained and evaluated on."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.checkpoints import load
from detrkit.cli.data import add_data_commands
from detrkit.cli.main import main
from detrkit.data import CocoDetection
from detrkit.data.check import check_format
from detrkit.data.formats import convert_to_coco, format_dataset, read_split
from detrkit.data.validate import CocoFormatError
from detrkit.engine.config import TrainConfig
from detrkit.engine.datasets import build_datasets, coco_ground_truth
from helpers import tiny_args

NAMES = ["cat", "dog", "person"]  # COCO category ids 1..3, YOLO class ids 0..2
# Per split, per image: file stem, (width, height), objects (class name, [x, y, w, h], crowd).
SPLITS = {
    "train": [
        ("a", (80, 60), [("cat", [10, 5, 20, 30], 0), ("dog", [40, 20, 30, 25], 0)]),
        ("b", (64, 48), [("person", [5, 5, 30, 30], 0), ("cat", [0, 0, 10, 10], 1)]),
    ],
    "val": [("c", (50, 70), [("dog", [10, 10, 20, 40], 0), ("person", [3, 7, 11, 13], 0)])],
}


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="detrkit")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def save_image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_coco(root: Path) -> dict[str, tuple[Path, Path]]:
    """The dataset as COCO files: per split, the images folder and the instances JSON."""
    written = {}
    categories = [{"id": i, "name": name} for i, name in enumerate(NAMES, start=1)]
    ids = 0
    for split, images in SPLITS.items():
        images_dir = root / split
        entries, annotations = [], []
        for image_id, (stem, size, objects) in enumerate(images, start=1):
            save_image(images_dir / f"{stem}.jpg", size, seed=ord(stem))
            entries.append(
                {"id": image_id, "file_name": f"{stem}.jpg", "width": size[0], "height": size[1]}
            )
            for name, box, crowd in objects:
                ids += 1
                annotations.append(
                    {
                        "id": ids,
                        "image_id": image_id,
                        "category_id": NAMES.index(name) + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": crowd,
                    }
                )
        path = root / f"instances_{split}.json"
        data = {"images": entries, "annotations": annotations, "categories": categories}
        path.write_text(json.dumps(data))
        written[split] = (images_dir, path)
    return written


def voc_xml(stem: str, size: tuple[int, int], objects: list) -> str:
    parts = [
        "<annotation>",
        f"  <filename>{stem}.jpg</filename>",
        f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>",
    ]
    for name, (x, y, w, h), crowd in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name>",
            f"    <difficult>{crowd}</difficult>",
            f"    <bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
            f"<xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox>",
            "  </object>",
        ]
    return "\n".join([*parts, "</annotation>", ""])


def write_voc(root: Path) -> Path:
    for split, images in SPLITS.items():
        for stem, size, objects in images:
            save_image(root / "JPEGImages" / f"{stem}.jpg", size, seed=ord(stem))
            xml = root / "Annotations" / f"{stem}.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            xml.write_text(voc_xml(stem, size, objects))
        lists = root / "ImageSets" / "Main"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{stem}\n" for stem, _, _ in images))
    return root


def yolo_lines(size: tuple[int, int], objects: list) -> str:
    width, height = size
    lines = []
    for name, (x, y, w, h), crowd in objects:
        if crowd:  # YOLO has no crowd objects: the crowd box is left out of the targets anyway
            continue
        cx, cy = (x + w / 2) / width, (y + h / 2) / height
        lines.append(f"{NAMES.index(name)} {cx:.6f} {cy:.6f} {w / width:.6f} {h / height:.6f}")
    return "\n".join(lines) + "\n"


def write_yolo(root: Path) -> Path:
    for split, images in SPLITS.items():
        for stem, size, objects in images:
            save_image(root / "images" / split / f"{stem}.jpg", size, seed=ord(stem))
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(yolo_lines(size, objects))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        "path: .\ntrain: images/train\nval: images/val\nnc: 3\nnames: [cat, dog, person]\n"
    )
    return data_yaml


@pytest.fixture
def three(tmp_path: Path) -> dict:
    """The same images and boxes as COCO files, a VOC folder and a YOLO dataset."""
    return {
        "coco": write_coco(tmp_path / "coco"),
        "voc": write_voc(tmp_path / "voc"),
        "yolo": write_yolo(tmp_path / "yolo"),
    }


def items(dataset) -> list[tuple[torch.Tensor, dict]]:
    return [dataset[i] for i in range(len(dataset))]


def assert_same_items(actual, expected) -> None:
    assert len(actual) == len(expected)
    for (image, target), (image_expected, target_expected) in zip(actual, expected):
        assert torch.equal(image, image_expected)
        assert target.keys() == target_expected.keys()
        for key in target:
            # YOLO's 6 decimals of normalised coordinates: well within 1e-3 pixels.
            atol = 1e-3 if key == "area" else 1e-5
            torch.testing.assert_close(
                target[key].float(), target_expected[key].float(), rtol=0, atol=atol, msg=key
            )


def coco_split(three: dict, split: str) -> CocoDetection:
    images_dir, path = three["coco"][split]
    return CocoDetection(images_dir, path, skip_unreadable=False)


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_three_formats_give_the_same_targets(three, split):
    with pytest.warns(UserWarning, match="1 crowd") if split == "train" else _no_warning():
        expected = coco_split(three, split)
    with pytest.warns(UserWarning, match="1 crowd") if split == "train" else _no_warning():
        voc = format_dataset(f"voc:{three['voc']}", split, skip_unreadable=False)
    yolo = format_dataset(f"yolo:{three['yolo']}", split, skip_unreadable=False)
    for dataset in (voc, yolo):
        assert dataset.class_names == NAMES
        assert_same_items(items(dataset), items(expected))
    assert voc.category_ids == [1, 2, 3] and yolo.category_ids == [0, 1, 2]
    assert voc.coco["categories"] == [{"id": i, "name": n} for i, n in enumerate(NAMES, 1)]
    # The difficult VOC object is a crowd one, for evaluation too.
    crowd = [a["iscrowd"] for a in voc.coco["annotations"]]
    assert crowd == ([0, 0, 0, 1] if split == "train" else [0, 0])
    assert coco_ground_truth(voc).getAnnIds() == [a["id"] for a in voc.coco["annotations"]]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_voc_boxes_are_one_based_inclusive(tmp_path):
    root = write_voc(tmp_path / "voc")
    dataset = format_dataset(f"voc:{root}", "val")
    boxes = [a["bbox"] for a in dataset.coco["annotations"]]
    assert boxes == [[10, 10, 20, 40], [3, 7, 11, 13]]  # xmin - 1, ymin - 1, w, h


def test_convert_writes_coco_files_that_read_the_same(three, tmp_path, capsys):
    for kind in ("voc", "yolo"):
        out = tmp_path / f"converted_{kind}"
        source = str(three[kind])
        assert run_cli("data", "convert", "--from", kind, source, "--to", "coco", str(out)) == 0
        printed = capsys.readouterr().out
        data = printed.splitlines()[-1].removeprefix("train on it with --data ")
        images_train, json_train, images_val, json_val = data.removeprefix("coco:").split(",")
        written = json.loads(Path(json_train).read_text())
        assert written["info"]["images_dir"] == images_train
        for split, (images_dir, path) in (
            ("train", (images_train, json_train)),
            ("val", (images_val, json_val)),
        ):
            crowd = split == "train" and kind == "voc"
            with pytest.warns(UserWarning, match="1 crowd") if crowd else _no_warning():
                direct = format_dataset(f"{kind}:{source}", split, skip_unreadable=False)
            with pytest.warns(UserWarning, match="1 crowd") if crowd else _no_warning():
                from_file = CocoDetection(images_dir, path, skip_unreadable=False)
            assert_same_items(items(from_file), items(direct))
            assert from_file.category_ids == direct.category_ids

        # Written once: a second run is refused unless --overwrite.
        with pytest.raises(FileExistsError, match="--overwrite"):
            convert_to_coco(f"{kind}:{source}", out)
        convert_to_coco(f"{kind}:{source}", out, overwrite=True)

    # The converted files train like the source: the same datasets from the config.
    converted = f"coco:{images_train},{json_train},{images_val},{json_val}"
    for data in (converted, f"yolo:{three['yolo']}"):
        train_set, val_set = build_datasets(TrainConfig(data=data, augment=False))
        assert len(train_set) == 2 and len(val_set) == 1


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    root = write_voc(tmp_path / "voc")
    (root / "Annotations" / "a.xml").write_text("<annotation><object>\n<name>cat</name>")
    out = tmp_path / "out"
    assert main(["data", "convert", "--from", "voc", str(root), "--to", "coco", str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "a.xml:2: not XML" in error and "Traceback" not in error
    with pytest.raises(CocoFormatError, match=r"a\.xml:2"):
        format_dataset(f"voc:{root}", "train")
    assert main(["data", "check", "voc:"]) == 2
    assert "voc: needs a path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="yolo: needs a path"):
        TrainConfig(data="yolo:").validate()


def every_finding(data: str, split: str) -> dict[str, list[str]]:
    """Every finding of the split's conversion and of the COCO rules, by kind."""
    found: dict[str, list[str]] = {}
    for finding in read_split(data, split).all_findings():
        found.setdefault(finding.kind, []).append(finding.detail)
    return found


def problems(reports) -> dict[str, list[str]]:
    """Every finding's kind and examples, over the splits' reports."""
    found: dict[str, list[str]] = {}
    for report in reports:
        for kind, problem in report.problems.items():
            found.setdefault(kind, []).extend(problem.examples)
    return found


def test_clean_datasets_check_clean(three, capsys):
    for kind in ("voc", "yolo"):
        reports = check_format(f"{kind}:{three[kind]}")
        found = problems(reports)
        assert set(found) <= {"crowd_annotation"}, found
        assert all(report.ok for report in reports)
        assert run_cli("data", "check", f"{kind}:{three[kind]}") == 0
        text = capsys.readouterr().out
        assert text.count("OK: usable") == 2 and "found 2 images" in text


def test_voc_check_names_file_and_line(tmp_path):
    root = write_voc(tmp_path / "voc")
    annotations = root / "Annotations"
    (annotations / "a.xml").write_text(
        "<annotation>\n<size><width>80</width><height>60</height></size>\n"
        "<object>\n<name>cat</name>\n<bndbox><xmin>1</xmin><ymin>x</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox>\n</object>\n"  # a bad number, line 5
        "<object>\n<name>dog</name>\n</object>\n"  # no bndbox, object at line 7
        "<object>\n<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>\n"
        "</object>\n"  # no name, object at line 10
        "<object>\n<name>cat</name><difficult>maybe</difficult>\n"  # line 14
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>\n</object>\n"
        "<object>\n<name>cat</name>\n"  # line 17: degenerate, xmax < xmin - 1
        "<bndbox><xmin>30</xmin><ymin>1</ymin><xmax>20</xmax><ymax>5</ymax></bndbox>\n</object>\n"
        "<object>\n<name>cat</name>\n"  # line 21: reaching outside the image
        "<bndbox><xmin>70</xmin><ymin>1</ymin><xmax>90</xmax><ymax>5</ymax></bndbox>\n</object>\n"
        "</annotation>\n"
    )
    (annotations / "b.xml").write_text("<annotation><object>")  # not XML
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nmissing_xml\n")
    (root / "JPEGImages" / "c.jpg").write_bytes(b"not an image")
    found = every_finding(f"voc:{root}", "train")
    malformed = found["malformed_xml"]
    assert len(malformed) == 5  # 4 objects of a.xml and b.xml
    a, b = annotations / "a.xml", annotations / "b.xml"
    assert f"{a}:5: <ymin> is 'x'; expected a number (object left out)" in malformed
    assert f"{a}:7: <object> has no <bndbox> (object left out)" in malformed
    assert f"{a}:10: <object> has no <name> (object left out)" in malformed
    assert f"{a}:14: <difficult> is 'maybe'; expected 0 or 1 (object left out)" in malformed
    assert any(e.startswith(f"{b}:1: not XML") for e in malformed)
    assert found["missing_xml"] == [
        f"{annotations / 'missing_xml.xml'}: no such file (image 'missing_xml')"
    ]
    assert found["negative_box_size"][0].startswith(f"{a}:17 has bbox [29.0, 0.0, -9.0, 5.0]")
    assert found["box_outside_image"][0].startswith(f"{a}:21 (image id 1)")
    reports = check_format(f"voc:{root}")
    assert "c.jpg" in reports[1].problems["unreadable_image"].examples[0]
    assert not reports[0].ok and not reports[1].ok

    # A listed image that is not there: skipped by training, refused by evaluation.
    (root / "JPEGImages" / "c.jpg").unlink()
    found = problems(check_format(f"voc:{root}"))
    assert found["missing_image_file"] == ["c.jpg (image id 1): no such file"]
    assert len(format_dataset(f"voc:{root}", "val")) == 1
    with pytest.raises(OSError, match=r"c\.jpg: no such file"):
        format_dataset(f"voc:{root}", "val", skip_unreadable=False)

    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(CocoFormatError, match=r"^\S*val\.txt: no such file \(voc:ROOT reads"):
        format_dataset(f"voc:{root}", "val")
    shutil.rmtree(root / "ImageSets")
    found = problems(check_format(f"voc:{root}"))
    assert set(found) == {"missing_split"}
    assert "ImageSets/Main/train.txt: no such file" in found["missing_split"][0]


def write_label(root: Path, split: str, stem: str, text: str) -> Path:
    path = root / "labels" / split / f"{stem}.txt"
    path.write_text(text)
    return path


def test_yolo_check_names_file_and_line(tmp_path):
    data_yaml = write_yolo(tmp_path / "yolo")
    root = data_yaml.parent
    write_label(
        root,
        "train",
        "a",
        "0 0.5 0.5 0.2 0.2\n"
        "1 0.5 0.5 0.2\n"  # 4 fields
        "\n"
        "1 0.5 abc 0.2 0.2\n"  # not a number
        "7 0.5 0.5 0.2 0.2\n"  # class id out of range
        "0 0.5 0.5 1.5 0.2\n"  # outside [0, 1]
        "0 0.5 0.5 0.0 0.2\n"  # degenerate
        "0 0.95 0.5 0.2 0.2\n"  # reaching outside the image
        "1.5 0.5 0.5 0.2 0.2\n",  # not an integer class
    )
    write_label(root, "train", "orphan", "0 0.5 0.5 0.2 0.2\n")  # no image
    (root / "labels" / "train" / "b.txt").unlink()  # an image without labels
    save_image(root / "images" / "val" / "d.jpg", (20, 20))
    write_label(root, "val", "d", "0 0.5 0.5 0.2 0.2\n")
    (root / "images" / "val" / "e.png").write_bytes(b"broken")
    found = problems(check_format(f"yolo:{data_yaml}"))
    a = root / "labels" / "train" / "a.txt"
    malformed = found["malformed_label_line"]
    assert f"{a}:2: 4 fields" in malformed[0]
    assert f"{a}:4: 'abc'" in malformed[1]
    assert f"{a}:9: class '1.5' is not an integer" in malformed[2]
    assert found["class_id_out_of_range"][0].startswith(f"{a}:5: class 7")
    assert "ids 0..2" in found["class_id_out_of_range"][0]
    assert found["coordinates_out_of_range"][0].startswith(f"{a}:6:")
    assert found["empty_box"][0].startswith(f"{a}:7")
    assert found["box_outside_image"][0].startswith(f"{a}:8")
    assert "orphan.txt: no image orphan.*" in found["label_without_image"][0]
    assert "b.jpg: no label file" in found["image_without_label"][0]
    assert "e.png: cannot be read" in found["unreadable_image"][0]

    # Training skips the unreadable image (warning), evaluation refuses it; errors refuse both.
    with pytest.raises(CocoFormatError, match=r"a\.txt:2: 4 fields .*\(and 4 more problems"):
        format_dataset(f"yolo:{data_yaml}", "train")
    with pytest.warns(UserWarning, match="image files that cannot be decoded"):
        assert len(format_dataset(f"yolo:{data_yaml}", "val")) == 2
    with pytest.raises(CocoFormatError, match=r"e\.png: cannot be read"):
        format_dataset(f"yolo:{data_yaml}", "val", skip_unreadable=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: images/train\nval: images/val\n", "has no 'names'"),
        ("names: [a]\nval: images/val\n", "has no 'train'"),
        ("names: [a]\ntrain: images/train\n", "has no 'val'"),
        ("names: [a, b]\nnc: 3\ntrain: images/train\nval: images/val\n", "has nc 3 but 2"),
        ("names: a\ntrain: images/train\nval: images/val\n", "expected a list of names"),
        ("names: [a\ntrain: x\n", "data.yaml:2: not YAML"),
        ("names: [a]\ntrain: images/nowhere\nval: images/val\n", "nowhere: no such folder"),
    ],
)
def test_yolo_yaml_problems(tmp_path, text, expected):
    data_yaml = write_yolo(tmp_path / "yolo")
    data_yaml.write_text(text)
    found = problems(check_format(f"yolo:{data_yaml}"))
    examples = [e for kind in ("invalid_data_yaml", "missing_split") for e in found.get(kind, [])]
    assert any(expected in example for example in examples), found
    with pytest.raises(CocoFormatError):
        format_dataset(f"yolo:{data_yaml}", "train" if "'val'" in expected else "val")


def test_yolo_names_dict_lists_and_missing_images(tmp_path):
    data_yaml = write_yolo(tmp_path / "yolo")
    root = data_yaml.parent
    (root / "train.txt").write_text("images/train/a.jpg\n./images/train/b.jpg\nimages/gone.jpg\n")
    data_yaml.write_text(
        "train: train.txt\nval: [images/val]\nnames:\n  0: cat\n  1: dog\n  2: person\n"
    )
    found = problems(check_format(f"yolo:{data_yaml}"))
    assert set(found) == {"missing_image_file", "crowd_annotation"} - {"crowd_annotation"}
    assert "gone.jpg: no such file" in found["missing_image_file"][0]
    dataset = format_dataset(f"yolo:{data_yaml}", "val")
    assert dataset.class_names == NAMES and len(dataset) == 1


def test_train_and_eval_on_voc_keep_the_category_ids(three, tmp_path, capsys):
    run_dir = tmp_path / "run"
    data = f"voc:{three['voc']}"
    args = tiny_args(run_dir, "--data", data, "--epochs", "1", "--max-steps-per-epoch", "1")
    assert main(args) == 0, capsys.readouterr().err
    weights = str(run_dir / "checkpoint.pth")
    config = load(weights).config
    assert config.class_names == NAMES and config.category_ids == [1, 2, 3]

    out = tmp_path / "eval"
    assert main(["eval", "--weights", weights, "--data", data, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}

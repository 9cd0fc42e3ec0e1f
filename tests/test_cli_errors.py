"""Every bad input of every command, by class: each option with a value it cannot take, and each
kind of file a path may point at, gives exit status 2 and one line ``detrkit: error: ...`` that
names the option or file and the problem, never a traceback. (``export`` has its own in
test_export_faults.py, ``data check`` in test_data_faults.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import detrkit
from detrkit.cli.main import main
from helpers import TINY_MODEL, write_square_coco

# A model that trains a step in a fraction of a second: an option wrongly accepted ends quickly
# (and fails the test) instead of training for minutes.
QUICK_TRAIN = [
    "--epochs", "1", "--max-steps-per-epoch", "1", "--digits-train", "2", "--digits-val", "1",
    "--workers", "0", "--image-scale", "0.1",
    *(f"--model-option={k}={v}" for k, v in {**TINY_MODEL, "num_feature_levels": 1}.items()),
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file of every kind a path option may be given."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"root": root}
    paths["model"] = detrkit.save(
        detrkit.build_model("deformable_detr_digits", **TINY_MODEL), root / "model"
    )
    paths["image"] = root / "image.png"
    Image.new("RGB", (64, 48), (200, 40, 90)).save(paths["image"])
    paths["folder"] = root / "folder"
    paths["folder"].mkdir()
    contents = {
        "corrupt.pth": b"PK\x03\x04 not a zip archive",
        "model.onnx": b"\x08\x08\x12\x07pytorch",  # an ONNX file's first fields
        "text.json": b"{",
        "list.json": b"[1, 2]",
        "binary.json": b"\xff\xfe\x00",
    }
    for name, data in contents.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    paths["coco_images"], paths["coco_json"] = write_square_coco(root / "coco", count=2)
    # detrkit directories whose detrkit.json is valid JSON but not a config of a model.
    for name, meta in {
        "meta_list": [1],
        "meta_no_format": {"config": {}},
        "meta_config_number": {"format": "detrkit", "config": 5},
        "meta_config_null": {"format": "detrkit", "config": None},
        "meta_bad_field": {"format": "detrkit", "config": {"model_type": "detr", "nheads": "8"}},
        "meta_unknown_field": {"format": "detrkit", "config": {"model_type": "detr", "x": 1}},
        "meta_model_type": {"format": "detrkit", "config": {"model_type": "yolo"}},
        "meta_version": {"format": "detrkit", "format_version": "1", "config": {}},
        "meta_newer": {"format": "detrkit", "format_version": 99, "config": {}},
    }.items():
        paths[name] = root / name
        paths[name].mkdir()
        (paths[name] / "detrkit.json").write_text(json.dumps(meta))
    return paths


WEIGHTS_PROBLEMS = {
    "missing.pth": "no such file or directory",
    "corrupt.pth": "not a readable PyTorch checkpoint",
    "model.onnx": "an exported model, not a checkpoint: run it with detrkit.deploy.ExportedModel",
    "image": "not a readable PyTorch checkpoint",
    "text.json": "not a readable PyTorch checkpoint",
    "folder": "unknown format",
    "meta_list": "not a detrkit config",
    "meta_no_format": "not a detrkit config",
    "meta_config_number": "the model config must be an object, got 5",
    "meta_config_null": "the model config must be an object, got None",
    "meta_bad_field": "nheads must be an integer",
    "meta_unknown_field": "unknown DETRConfig fields: x",
    "meta_model_type": "unknown model_type 'yolo'",
    "meta_version": "format_version must be an integer",
    "meta_newer": "format version 99 is newer",
}


def _weights_commands(files, weights: str) -> list[list[str]]:
    image, out = str(files["image"]), str(files["root"] / "never")
    return [
        ["inspect", weights],
        ["convert", weights, "--out", out],
        ["eval", "--weights", weights, "--data", "digits"],
        ["predict", image, "--weights", weights, "--out", out],
        ["explain", image, "--weights", weights, "--out", out],
        ["train", "--finetune", weights, "--output", out, *QUICK_TRAIN],
    ]


def assert_one_line_error(capsys, args: list[str], *named: str) -> None:
    try:
        code = main(args)
    except SystemExit as exit_:  # the parser's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{args}: exit {code}, stderr {err!r}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("detrkit: error: "), err
    for text in named:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


@pytest.mark.parametrize("kind", sorted(WEIGHTS_PROBLEMS))
def test_every_kind_of_bad_weights_is_named_by_every_command(files, capsys, kind):
    path = files.get(kind, files["root"] / kind)
    for args in _weights_commands(files, str(path)):
        assert_one_line_error(capsys, args, str(path), WEIGHTS_PROBLEMS[kind])
    assert not (files["root"] / "never").exists()


def test_a_transformers_config_that_cannot_build_a_model_is_named(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.DetrConfig(encoder_layers=1, decoder_layers=1, num_queries=5)
    transformers.DetrForObjectDetection(config).save_pretrained(tmp_path)
    capsys.readouterr()  # its progress bar
    config_file = tmp_path / "config.json"
    good = json.loads(config_file.read_text())
    for change, problem in [
        ({"encoder_attention_heads": "8"}, "encoder_attention_heads must be an integer"),
        ({"encoder_attention_heads": 7}, "cannot build a model from it: hidden_dim (256)"),
        ({"num_queries": 2.5}, "num_queries must be an integer"),
        ({"dropout": [0.1]}, "dropout must be a number"),
        ({"dilation": "yes"}, "dilation must be true or false"),
        ({"backbone_config": 3}, "backbone_config must be an object"),
        ({"id2label": ["cat"]}, "id2label must be an object"),
        ({"model_type": "yolos"}, "model_type is 'yolos'"),
    ]:
        config_file.write_text(json.dumps({**good, **change}))
        assert_one_line_error(capsys, ["inspect", str(tmp_path)], str(config_file), problem)
    config_file.write_text("[]")
    assert_one_line_error(capsys, ["inspect", str(tmp_path)], str(config_file), "JSON object")


def _config(files, name: str, values) -> str:
    path = files["root"] / name
    path.write_text(json.dumps(values))
    return str(path)


def train_cases(files) -> list[tuple[list[str], tuple[str, ...]]]:
    coco = f"coco:{files['coco_images']},{files['coco_json']}"
    return [
        (["--config", "missing.json"], ("missing.json", "not a readable JSON config")),
        (["--config", str(files["folder"])], (str(files["folder"]), "Is a directory")),
        (["--config", str(files["text.json"])], (str(files["text.json"]), "JSON config")),
        (["--config", str(files["binary.json"])], (str(files["binary.json"]), "JSON config")),
        (["--config", str(files["list.json"])], ("list.json", "not a training config")),
        (["--config", _config(files, "a.json", {"epochs": "5"})], ("a.json", "epochs must be")),
        (["--config", _config(files, "b.json", {"augment": 1})], ("b.json", "augment must be")),
        (["--config", _config(files, "c.json", {"image_scale": None})], ("c.json", "image_scale")),
        (["--config", _config(files, "d.json", {"model_options": []})], ("d.json", "an object")),
        (["--config", _config(files, "e.json", {"nope": 1})], ("e.json", "unknown training")),
        (["--device", "cuda"], ("device 'cuda'", "no CUDA GPU")),
        (["--device", "bogus"], ("device 'bogus'",)),
        (["--model", "nope"], ("unknown model 'nope'",)),
        (["--data", "bogus"], ("data must be", "'bogus'")),
        (["--data", coco], ("data must be", "TRAIN_IMAGES")),
        (["--data", f"{coco},{coco[5:]}".replace("instances", "missing"), "--model",
          "detr_digits"], ("missing.json",)),
        (["--resume", str(files["folder"])], (str(files["folder"]), "no checkpoint.pth")),
        (["--output", str(files["image"])], (str(files["image"]), "not a directory")),
        (["--label-mapping", "x"], ("label_mapping must be",)),
        (["--amp", "x"], ("amp must be",)),
        (["--amp", "fp16"], ("amp 'fp16' needs a CUDA device",)),
        (["--ema-decay", "1"], ("ema_decay must be",)),
        (["--model-option", "bogus=1"], ("unknown options for deformable_detr_digits: bogus",)),
        (["--model-option", "hidden_dim=x"], ("hidden_dim must be an integer",)),
        (["--model-option", "novalue"], ("--model-option", "KEY=VALUE")),
        (["--num-classes", "0"], ("num_classes must be at least 1",)),
        (["--backbone-pretrain-steps", "-1"], ("backbone_pretrain_steps",)),
        (["--backbone-pretrain-images", "0"], ("backbone_pretrain_images",)),
        (["--seed", "x"], ("--seed", "invalid int")),
        (["--image-scale", "0"], ("image_scale must be positive",)),
        (["--workers", "-1"], ("workers must be non-negative",)),
        *(
            ([f"--{name.replace('_', '-')}", "0"], (f"{name} must be at least 1",))
            for name in ("epochs", "batch_size", "grad_accum", "eval_every", "checkpoint_every",
                         "log_every", "digits_train", "digits_val", "lr_drop",
                         "max_steps_per_epoch")
        ),
        *(
            ([f"--{name.replace('_', '-')}", bad], (f"{name} must be a non-negative number",))
            for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay",
                         "clip_max_norm")
            for bad in ("-1", "nan")
        ),
    ]  # fmt: skip


def test_every_bad_training_option_is_named_before_anything_is_written(files, capsys):
    out = files["root"] / "run"
    for extra, named in train_cases(files):
        assert_one_line_error(capsys, ["train", "--output", str(out), *QUICK_TRAIN, *extra], *named)
        assert not out.exists(), extra


def test_every_bad_evaluation_option_is_named(files, capsys):
    base = ["eval", "--weights", str(files["model"]), "--data"]
    coco = f"coco:{files['coco_images']},{files['coco_json']}"
    for extra, named in [
        ([f"{coco},{coco[5:]}"], ("expected coco:VAL_IMAGES,VAL_JSON",)),
        (["bogus"], ("--data 'bogus'",)),
        ([coco.replace("instances", "missing")], ("missing.json",)),
        ([coco], ("predicts 10 classes but --data", "has 2")),
        (["digits", "--batch-size", "0"], ("batch_size must be at least 1",)),
        (["digits", "--digits-val", "0"], ("digits_val must be at least 1",)),
        (["digits", "--image-scale", "0"], ("image_scale must be positive",)),
        (["digits", "--device", "cuda"], ("device 'cuda'",)),
        (["digits", "--out", str(files["image"])], ("--out", "a file is there")),
        (["digits", "--amp", "bf16", "--precision", "fp32"], ("choose one of amp",)),
        (["digits", "--amp", "x"], ("--amp", "invalid choice")),
        (["digits", "--amp", "fp16"], ("amp 'fp16' needs a CUDA device",)),
        (["digits", "--precision", "fp16"], ("fp16", "needs a GPU")),
        (["digits", "--label-mapping", "x"], ("--label-mapping", "invalid choice")),
        (["digits", "--seed", "x"], ("--seed", "invalid int")),
        (["digits", "--workers", "-1"], ("--workers", "non-negative")),
    ]:
        assert_one_line_error(capsys, [*base, *extra], *named)


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_every_bad_option_of_predict_and_explain_is_named(files, capsys, command):
    out = files["root"] / "pictures"
    base = [command, str(files["image"]), "--weights", str(files["model"])]
    cases = [
        (["--out", str(out), "--threshold", "2"], ("--threshold", "between 0 and 1")),
        (["--out", str(out), "--threshold", "x"], ("--threshold",)),
        (["--out", str(files["image"])], ("--out", "not a directory")),
        (["--out", str(out), "--device", "cuda"], ("device 'cuda'",)),
        (["--out", str(out), "--device", "gpu0"], ("device 'gpu0'",)),
        (["--out", str(out), "--short-side", "-1"], ("--short-side", "non-negative")),
        (["--out", str(out), "--max-size", "0"], ("--max-size", "positive")),
        (["--out", str(out), "--precision", "fp16"], ("fp16", "needs a GPU")),
        (["--out", str(out), "--precision", "x"], ("--precision", "invalid choice")),
    ]
    if command == "predict":
        cases.append((["--out", str(out), "--batch-size", "0"], ("--batch-size", "positive")))
    else:
        cases += [
            (["--out", str(out), "--pixel", "a"], ("--pixel", "X,Y")),
            (["--out", str(out), "--pixel", "999,9"], ("pixel (999.0, 9.0)", "outside")),
            (["--out", str(out), "--max-objects", "0"], ("--max-objects", "positive")),
        ]
    for extra, named in cases:
        assert_one_line_error(capsys, [*base, *extra], *named)
    missing = [command, "nothing.png", "--weights", str(files["model"]), "--out", str(out)]
    assert_one_line_error(capsys, missing, "nothing.png", "no such file")
    assert not out.exists()


def test_every_bad_option_of_the_other_commands_is_named(files, capsys):
    model, image = str(files["model"]), str(files["image"])
    for args, named in [
        (["trace", "--model", "nope"], ("--model", "invalid choice")),
        (["trace", "--model", "detr_r50", "--size", "0", "9"], ("--size", "positive")),
        (["trace", "--model", "detr_r50", "--model-option", "x=1"], ("unknown options",)),
        (["convert", model, "--out", image], ("--out", "not a directory")),
        (["convert", model, "--out", model], ("--out", "holds earlier results", "--overwrite")),
        (["data", "make-digits", image, "--train", "1", "--val", "1"], (image,)),
        (["data", "make-digits", "x", "--train", "-1", "--val", "1"], ("--train",)),
        (["models", "--bogus"], ("unrecognized arguments: --bogus",)),
        (["nope"], ("invalid choice: 'nope'",)),
    ]:
        assert_one_line_error(capsys, args, *named)

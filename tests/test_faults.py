"""Faults and bad input, by class: earlier results kept, links not followed, full disks named,
non-finite models refused, temporary files of killed writes removed, every bad option of every
command named in one line without a traceback."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

import detrkit
from detrkit.cli.main import main
from detrkit.engine import train as train_module
from detrkit.engine.config import TrainConfig
from detrkit.engine.logger import MetricsLog
from detrkit.engine.state import load_training_state
from detrkit.engine.train import RUN_FILES, finetune_config
from detrkit.files import WriteError, append_line, remove_temporaries, write_atomically
from helpers import TINY_MODEL, tiny_args, write_square_coco

SRC = Path(detrkit.__file__).parent


# --- files: whole or not at all, never through a link, a full disk named ----------------------


def _fail_with(error: BaseException):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of it")
        raise error

    return write


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk is full"),
        # torch.save's C++ writer reports a full disk so:
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                "writing file data/0: file write failed"
            ),
            "the disk is full",
        ),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
)
def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, error, reason):
    target = tmp_path / "checkpoint.pth"
    target.write_text("previous")
    with pytest.raises(WriteError) as raised:
        write_atomically(target, _fail_with(error))
    message = str(raised.value)
    assert str(target) in message and reason in message and "previous file is intact" in message
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left


def test_writes_replace_links_instead_of_following_them(tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("not yours")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("written.json", "metrics.jsonl"):
        (out / name).symlink_to(victim)
    write_atomically(out / "written.json", lambda tmp: tmp.write_text("{}"))
    assert not (out / "written.json").is_symlink() and (out / "written.json").read_text() == "{}"
    with pytest.raises(WriteError, match=r"metrics\.jsonl: it is a symbolic link"):
        append_line(out / "metrics.jsonl", "{}")
    assert victim.read_text() == "not yours"


# Calls that write a file's content. Each must write a temporary file of write_atomically (by
# convention always named tmp), or an in-memory buffer, or live in detrkit/files.py, the one
# module that writes otherwise.
_WRITE_CALL = re.compile(
    r"\.(write_text|write_bytes|savefig|save_file)\(|torch\.save\(|\.save\(|"
    r"open\([^)]*['\"][wa]b?['\"]"
)


def test_every_file_detrkit_writes_goes_through_the_atomic_writer():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "files.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if _WRITE_CALL.search(code) and not re.search(r"\btmp\b|\bbuffer\b|def ", code):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_temporaries_of_a_killed_write_are_removed_for_their_target_only(tmp_path):
    left = [tmp_path / ".checkpoint.pth.a1b2.tmp", tmp_path / ".model.onnx.x.tmp"]
    for path in left:
        path.write_bytes(b"x" * 10)
    keep = tmp_path / "notes.tmp"
    keep.write_text("a user's file")
    assert remove_temporaries(tmp_path, "checkpoint.pth") == [left[0]]
    assert remove_temporaries(tmp_path) == [left[1]]
    assert keep.exists()


# --- training runs: never overwritten, resumed without repeats, no NaN kept as good ------------


def test_metrics_of_a_resumed_run_keep_what_came_before_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"type": "pretrain", "step": 50})  # pre-training counts its own steps
    for step in range(1, 7):
        log.write({"type": "train", "epoch": 1 + (step > 4), "step": step, "loss": 1.0})
    log.write({"type": "eval", "epoch": 1, "AP": 0.1})
    log.write({"type": "eval", "epoch": 2, "AP": 0.2})
    with open(log.path, "a") as torn:
        torn.write('{"type": "train", "ep')  # killed in the middle of a line
    assert len(log.read()) == 9  # the torn line is not a record
    log.keep_until(step=4, epoch=1)
    kept = log.read()
    assert [r.get("step") for r in kept if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in kept if r["type"] == "eval"] == [1]
    assert kept[0]["type"] == "pretrain"
    log.write({"type": "train", "epoch": 2, "step": 5})
    assert log.read()[-1]["step"] == 5  # appended on a line of its own


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "1")) == 0
    return run_dir


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_new_run_refuses_a_directory_holding_any_file_of_a_run(tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_text("an earlier result")
    assert main(tiny_args(run_dir, "--epochs", "1")) == 2
    message = capsys.readouterr().err
    assert f"--output {run_dir}: holds an earlier run ({name})" in message
    assert "--resume" in message and "--overwrite" in message
    assert (run_dir / name).read_text() == "an earlier result"
    assert sorted(p.name for p in run_dir.iterdir()) == [name]


def test_overwrite_replaces_a_finished_run_without_following_its_links(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "1")) == 0
    victims = {}
    for name in RUN_FILES:  # every file a run writes, replaced by a link to a file elsewhere
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("not yours")
        (run_dir / name).unlink()
        (run_dir / name).symlink_to(victims[name])
    args = tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "2")
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0
    for name in RUN_FILES:
        assert victims[name].read_text() == "not yours"
        assert (run_dir / name).is_file() and not (run_dir / name).is_symlink()
    records = MetricsLog(run_dir).read()
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]  # nothing appended


def test_a_resume_removes_the_temporaries_of_a_killed_checkpoint_write(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "1")) == 0
    left = run_dir / ".checkpoint.pth.k9x.tmp"  # what kill -9 inside torch.save leaves
    left.write_bytes(b"\0" * 1000)
    args = tiny_args(run_dir, "--epochs", "2", "--max-steps-per-epoch", "1", "--resume", "auto")
    assert main(args) == 0
    assert not left.exists()
    assert "removed .checkpoint.pth.k9x.tmp" in capsys.readouterr().out
    steps = [r["step"] for r in MetricsLog(run_dir).read() if r["type"] == "train"]
    assert steps == [1, 2]


def test_weights_that_turn_non_finite_are_never_written_as_the_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """The weights go NaN in epoch 2 while every loss stays finite (the NaN shows in the loss
    only at the next step): the checkpoint of epoch 2 is refused, epoch 1's is kept."""
    real_epoch = train_module._train_one_epoch

    def poisoning_epoch(model, *args, **kwargs):
        result = real_epoch(model, *args, **kwargs)
        if kwargs.get("first_batch", 0) == 0 and args[8] == 1:  # epoch index 1: the second
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(train_module, "_train_one_epoch", poisoning_epoch)
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--epochs", "3", "--eval-every", "5", "--max-steps-per-epoch", "1")
    assert main(args) == 1
    message = capsys.readouterr().out
    assert "weights hold NaN or infinity" in message and "last good checkpoint" in message
    state = load_training_state(run_dir / "checkpoint.pth")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_diverged_model_is_refused_by_eval_predict_and_the_detector(tmp_path, capsys):
    model = detrkit.build_model("deformable_detr_digits", **TINY_MODEL)
    with torch.no_grad():
        model.transformer.decoder.layers[0].linear1.weight[0, 0] = float("nan")
    weights = detrkit.save(model, tmp_path / "diverged")
    for args in (
        ["eval", "--weights", str(weights), "--data", "digits", "--digits-val", "2"],
        [
            "predict",
            str(_an_image(tmp_path)),
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "out"),
        ],
    ):
        assert main(args) == 2
        message = capsys.readouterr().err
        assert str(weights) in message
        assert "transformer.decoder.layers.0.linear1.weight" in message
        assert "NaN or infinity" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="the model given to Detector: the model's weights hold"):
        detrkit.Detector(model)


def test_nan_outputs_of_finite_weights_are_refused_by_evaluation():
    from detrkit.engine.evaluate import predict_dataset
    from detrkit.models import PostProcess

    model = detrkit.build_model("deformable_detr_digits", **TINY_MODEL)
    model.register_forward_hook(
        lambda module, inputs, outputs: {**outputs, "pred_boxes": outputs["pred_boxes"] * torch.nan}
    )
    images, mask = torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    batch = (images, mask, [{"image_id": torch.tensor(7), "orig_size": torch.tensor([64, 64])}])
    with pytest.raises(ValueError, match=r"images \[7\]: the model's outputs hold NaN"):
        predict_dataset(
            model, [batch], PostProcess.for_config(model.config), None, torch.device("cpu")
        )


def _an_image(directory: Path) -> Path:
    from PIL import Image

    path = directory / "image.png"
    Image.new("RGB", (96, 80), (120, 30, 200)).save(path)
    return path


# --- fine-tuning and category ids ------------------------------------------------------------


def test_fine_tuning_takes_the_source_runs_data_settings_unless_given(tmp_path):
    source = tmp_path / "checkpoint.pth"
    run = TrainConfig(image_scale=0.2, augment=False, batch_size=4)
    torch.save({"model": {}, "train_config": run.to_dict()}, source)

    config, notes = finetune_config(TrainConfig(finetune=str(source)), given={"finetune"})
    assert (config.image_scale, config.augment, config.batch_size) == (0.2, False, 4)
    assert notes == [
        f"fine-tuning with the data settings of the source run ({source}): image_scale=0.2, "
        "augment=False, batch_size=4"
    ]
    given = TrainConfig(finetune=str(source), image_scale=0.5)
    config, notes = finetune_config(given, given={"finetune", "image_scale"})
    assert (config.image_scale, config.augment, config.batch_size) == (0.5, False, 4)
    assert "image_scale=0.5 (the source run's: 0.2)" in notes[1]
    # Without the names of the given options (a --config file), those off their defaults count.
    config, _ = finetune_config(given, given=None)
    assert config.image_scale == 0.5 and config.batch_size == 4
    # Weights no detrkit run wrote give nothing to take.
    detrkit.save(detrkit.build_model("detr_digits"), tmp_path / "plain")
    plain = TrainConfig(finetune=str(tmp_path / "plain"))
    assert finetune_config(plain, None) == (plain, [])


def test_a_model_keeps_its_datasets_category_ids_in_what_it_writes(tmp_path, capsys):
    images_dir, annotations = write_square_coco(tmp_path / "coco", count=4)
    coco = json.loads(annotations.read_text())
    renumber = {1: 5, 2: 9}
    coco["categories"] = [{"id": 1, "name": "one"}] + [
        {"id": renumber[c["id"]], "name": c["name"]} for c in coco["categories"]
    ]
    for entry in coco["annotations"]:
        entry["category_id"] = renumber[entry["category_id"]]
    coco["annotations"][0]["category_id"] = 1
    annotations.write_text(json.dumps(coco))
    data = f"coco:{images_dir},{annotations},{images_dir},{annotations}"
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--data", data, "--epochs", "1", "--max-steps-per-epoch", "1")
    assert main(args) == 0
    model = detrkit.load(run_dir / "checkpoint.pth")
    assert model.config.category_ids == [1, 5, 9]
    assert model.config.class_names == ["one", "a", "b"]

    out = tmp_path / "predicted"
    predict = ["predict", str(images_dir), "--weights", str(run_dir / "checkpoint.pth")]
    assert main([*predict, "--out", str(out), "--threshold", "0"]) == 0
    assert "category_id is the training dataset's category id" in capsys.readouterr().out
    written = json.loads((out / "detections.json").read_text())
    assert written and {d["category_id"] for d in written} <= {1, 5, 9}
    assert {d["category_id"] for d in written} - {1}  # not the indices 0, 1, 2
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert results and {d["category_id"] for d in results} <= {1, 5, 9}

    # Writing again into the same place is refused, then allowed when asked for.
    assert main([*predict, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*predict, "--out", str(out), "--overwrite"]) == 0

    # Scored against a dataset of other classes, the numbers would mean nothing.
    other_images, other_json = write_square_coco(tmp_path / "other", count=2)
    bad = ["eval", "--weights", str(run_dir / "checkpoint.pth"), "--data"]
    assert main([*bad, f"coco:{other_images},{other_json}"]) == 2
    assert "predicts 3 classes but --data" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["config.json", "checkpoint.pth", "metrics.png"])
def test_kill_9_in_the_middle_of_each_write_then_resume(tmp_path, stage):
    """SIGKILL after a file's temporary is written and before it replaces the file, at each stage
    of a run (start, checkpoint, final plot): the files there are whole, and `--resume auto`
    cleans up and finishes the run with each step logged once."""
    import os
    import signal
    import subprocess
    import sys

    from detrkit.files import KILL_AT_VARIABLE

    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "2", "--resume", "auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT_VARIABLE: stage}
    killed = subprocess.run([sys.executable, "-m", "detrkit", *args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert list(run_dir.glob(f".{stage}.*.tmp"))  # killed mid-write, as asked
    assert not (run_dir / stage).exists()  # never half a file
    if (run_dir / "checkpoint.pth").exists():
        assert load_training_state(run_dir / "checkpoint.pth")["epoch"] == 1
    del env[KILL_AT_VARIABLE]
    resumed = subprocess.run([sys.executable, "-m", "detrkit", *args], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert not list(run_dir.glob(".*.tmp"))
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    steps = [r["step"] for r in MetricsLog(run_dir).read() if r["type"] == "train"]
    assert steps == [1, 2]

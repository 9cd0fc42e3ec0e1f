"""The training and evaluation engine, on tiny generated data."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import detrkit
from detrkit.cli.main import main
from detrkit.engine import train as train_module
from detrkit.engine.config import TrainConfig
from detrkit.engine.datasets import EpochBatches
from detrkit.engine.evaluate import (
    COCO_METRICS,
    coco_metrics,
    merge_rank_results,
    to_coco_results,
)
from detrkit.engine.state import load_training_state
from detrkit.engine.train import resumed_config
from detrkit.loss import build_criterion
from detrkit.ops import native_bf16
from helpers import TINY_MODEL, tiny_args, write_square_coco


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_training_state(run_dir / "checkpoint.pth")["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def two_digit_scenes():
    """A batch of the first two built-in training scenes at the tiny runs' scale (0.12)."""
    dataset = detrkit.data.DigitsDetection(
        "train",
        2,
        transforms=detrkit.data.make_val_transforms(detrkit.data.AugmentationConfig().scaled(0.12)),
    )
    return detrkit.data.collate_fn([dataset[0], dataset[1]])


def test_training_steps_overfit_a_fixed_batch():
    torch.manual_seed(0)
    model = detrkit.build_model("deformable_detr_digits", dropout=0.0, **TINY_MODEL).train()
    images, mask, targets = two_digit_scenes()
    criterion = build_criterion(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = criterion(model(images, mask), targets)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("preset", ["detr_r50", "deformable_detr"])
def test_channels_last_training_computes_the_same_gradients(preset):
    """detrkit train stores convolution weights channels-last (TrainConfig.channels_last): the
    same loss and gradients as the usual layout, up to float rounding, and the gradients keep
    their parameters' layout."""
    torch.manual_seed(0)
    options = {
        k: v
        for k, v in TINY_MODEL.items()
        if preset.startswith("deformable") or k != "num_feature_levels"
    }
    model = detrkit.build_model(preset, dropout=0.0, **options).train()
    images, mask, targets = two_digit_scenes()
    criterion = build_criterion(model.config)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert (
        channels_last.backbone[0]
        .body["conv1"]
        .weight.is_contiguous(memory_format=torch.channels_last)
    )
    losses = []
    for net in (model, channels_last):
        loss = criterion(net(images, mask), targets)["loss"]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, param), other in zip(model.named_parameters(), channels_last.parameters()):
        if param.grad is None:
            assert other.grad is None, name
            continue
        assert other.grad.stride() == other.stride(), name
        # oneDNN's channels-last kernels sum in another order. In the ResNet that can move a
        # pre-activation across zero, so one ReLU passes a gradient in one layout and not in the
        # other: on these tiny maps (tens of pixels) that is up to 6e-3 of a weight's largest
        # gradient. Elsewhere the layouts agree to 1e-4; a layout mistake would be of order one.
        tolerance = 2e-2 if name.startswith("backbone") else 1e-4
        scale = param.grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(
            other.grad / scale, param.grad / scale, rtol=0, atol=tolerance, msg=name
        )


@pytest.mark.full
def test_compiled_training_writes_the_same_kind_of_checkpoint(tmp_path):
    """--compile trains through torch.compile (the fused dropout and deformable attention ops
    included, backward too); the checkpoint keeps the plain model's keys. Minutes to compile."""
    assert (
        main(tiny_args(tmp_path, "--compile", "--epochs", "1", "--max-steps-per-epoch", "3")) == 0
    )
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [entry["loss"] for entry in losses if entry["type"] == "train"]
    assert len(train_losses) == 3 and all(np.isfinite(train_losses))
    weights = final_weights(tmp_path)
    reference = detrkit.build_model("deformable_detr_digits", **TINY_MODEL).state_dict()
    assert weights.keys() == reference.keys()
    assert detrkit.load(tmp_path / "checkpoint.pth").config.hidden_dim == TINY_MODEL["hidden_dim"]


def test_train_checkpoint_eval_finetune_from_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_args(run_dir, "--epochs", "1")) == 0
    for name in ("checkpoint.pth", "config.json", "metrics.jsonl", "metrics.png"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    assert evaluation["epoch"] == 1 and set(COCO_METRICS) <= set(evaluation)
    config = TrainConfig.from_file(run_dir / "config.json")
    assert config.lr == 2e-4 and config.lr_linear_proj_mult == 0.1  # the recipe's values
    # Trained in channels-last memory (the default), which the checkpoint keeps; the model loads
    # from it in the usual layout, and evaluates to the same numbers below.
    trained_conv = final_weights(run_dir)["backbone.0.body.layer2.0.conv2.weight"]
    assert config.channels_last and trained_conv.is_contiguous(memory_format=torch.channels_last)

    out = tmp_path / "eval"
    args = ["eval", "--weights", str(run_dir / "checkpoint.pth"), "--data", "digits"]
    capsys.readouterr()
    # The data settings come from the training run: its images, scale and batch size.
    assert main([*args, "--out", str(out)]) == 0
    assert "the training run's batch_size=2, image_scale=0.12" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    # The same weights on the same images: the numbers the training run logged.
    assert metrics == {k: evaluation[k] for k in COCO_METRICS}

    def images_evaluated() -> int:
        return len({entry["image_id"] for entry in json.loads((out / "results.json").read_text())})

    assert images_evaluated() == 4
    # Options given on the command line win.
    assert main([*args, "--digits-val", "3", "--out", str(out)]) == 2  # earlier results there
    assert f"--out {out}: holds earlier results (metrics.json, results.json)" in (
        capsys.readouterr().err
    )
    assert main([*args, "--digits-val", "3", "--out", str(out), "--overwrite"]) == 0
    assert "digits_val" not in capsys.readouterr().err
    assert images_evaluated() == 3
    # --amp auto says what it chose on this machine.
    assert main([*args, "--digits-val", "1", "--amp", "auto"]) == 0
    chosen = "bf16" if native_bf16(torch.device("cpu")) else "off (no bf16 in hardware)"
    assert f"mixed precision (amp auto): {chosen} on cpu" in capsys.readouterr().err
    model = detrkit.load(run_dir / "checkpoint.pth")
    assert model.config.class_names == [str(d) for d in range(10)]

    # Fine-tuning on a dataset with 2 classes: a new class head, every other weight kept.
    images_dir, annotations = write_square_coco(tmp_path / "coco")
    data = f"coco:{images_dir},{annotations},{images_dir},{annotations}"
    tuned_dir = tmp_path / "tuned"
    args = [
        "train",
        "--finetune",
        str(run_dir / "checkpoint.pth"),
        "--data",
        data,
        "--output",
        str(tuned_dir),
        "--epochs",
        "1",
        "--image-scale",
        "0.12",
        "--workers",
        "0",
        "--freeze-backbone",
        "--max-steps-per-epoch",
        "1",
    ]
    assert main(args) == 0
    assert "class head re-initialised (10 -> 2 classes)" in capsys.readouterr().out
    tuned = load_training_state(tuned_dir / "checkpoint.pth")["model"]
    assert tuned["class_embed.0.weight"].shape == (2, 64)
    before = final_weights(run_dir)
    frozen = ("layer2.0.conv1.weight", "conv1.weight", "bn1.running_mean", "layer1.0.bn2.weight")
    for name in frozen:
        assert torch.equal(tuned[f"backbone.0.body.{name}"], before[f"backbone.0.body.{name}"])

    # Model options override the checkpoint's config as they override a preset's (num_classes
    # included, which the dataset also sets).
    args[args.index(str(tuned_dir))] = str(tmp_path / "again")
    assert main([*args, "--num-classes", "2", "--model-option=dropout=0.0"]) == 0
    assert "(10 -> 2 classes)" in capsys.readouterr().out
    again = load_training_state(tmp_path / "again" / "checkpoint.pth")
    assert again["model_config"]["dropout"] == 0.0
    args[args.index(str(tmp_path / "again"))] = str(tmp_path / "refused")
    assert main([*args, "--model-option=no_such_field=1"]) == 2
    assert f"unknown options for {run_dir / 'checkpoint.pth'}: no_such_field" in (
        capsys.readouterr().err
    )


def test_checkpoint_of_an_ema_run_loads_the_weights_it_evaluated(tmp_path, capsys):
    """With --ema-decay the run evaluates the averaged weights: loading its checkpoint (eval,
    predict, export, fine-tuning) gives those, and `detrkit eval` repeats the logged numbers;
    the raw weights stay in the checkpoint for resuming."""
    run_dir = tmp_path / "run"
    assert main(tiny_args(run_dir, "--epochs", "1", "--ema-decay", "0.5")) == 0
    state = load_training_state(run_dir / "checkpoint.pth")
    loaded = detrkit.load(run_dir / "checkpoint.pth").state_dict()
    name = "transformer.decoder.layers.0.linear1.weight"
    assert torch.equal(loaded[name], state["ema"][f"module.{name}"])
    assert not torch.equal(loaded[name], state["model"][name])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    out = tmp_path / "eval"
    checkpoint = str(run_dir / "checkpoint.pth")
    assert main(["eval", "--weights", checkpoint, "--data", "digits", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {k: evaluation[k] for k in COCO_METRICS}


def test_config_file_round_trip_and_bad_options(tmp_path):
    config = TrainConfig(epochs=3, model_options={"num_queries": 5})
    config.save(tmp_path / "config.json")
    assert TrainConfig.from_file(tmp_path / "config.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": 1, "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"bad\.json: unknown training options: learning_rate"):
        TrainConfig.from_file(tmp_path / "bad.json")
    # Out-of-range values are refused before anything is built or written.
    for option, value in [("epochs", "-1"), ("batch-size", "0"), ("image-scale", "0")]:
        run_dir = tmp_path / option
        assert main(tiny_args(run_dir, f"--{option}", value)) == 2
        assert not run_dir.exists()


def test_resume_takes_only_the_changes_a_resume_allows(tmp_path, capsys):
    stored = TrainConfig(model="detr_digits", epochs=2, lr=1e-4, workers=2)
    given = TrainConfig(epochs=4, workers=0, lr=None)  # lr unset: the run's value holds
    resumed = resumed_config(given, stored, epochs_done=2)
    assert (resumed.epochs, resumed.workers, resumed.lr, resumed.model) == (
        4,
        0,
        1e-4,
        "detr_digits",
    )
    with pytest.raises(ValueError, match=r"lr=0\.5 \(the run's: 0\.0001\)"):
        resumed_config(TrainConfig(lr=0.5), stored, epochs_done=1)
    with pytest.raises(ValueError, match="already trained 2 epochs"):
        resumed_config(TrainConfig(epochs=1), stored, epochs_done=2)
    # Fields the command line named are compared even at their default values.
    no_workers = dataclasses.replace(stored, workers=0)
    back = resumed_config(TrainConfig(workers=2), no_workers, 2, names=["workers"])
    assert back.workers == 2 == TrainConfig().workers
    with pytest.raises(ValueError, match="amp='none'"):
        amp_run = dataclasses.replace(stored, amp="bf16")
        resumed_config(TrainConfig(amp="none"), amp_run, epochs_done=2, names=["amp"])

    # Fine-tuning: the checkpoint sets the model; a --model of another kind is an error.
    run_dir = tmp_path / "run"
    again = tiny_args(run_dir, "--epochs", "1", "--max-steps-per-epoch", "1", "--overwrite")
    assert main(again) == 0
    args = tiny_args(tmp_path / "tuned", "--finetune", str(run_dir / "checkpoint.pth"))
    args[args.index("deformable_detr_digits")] = "detr_digits"
    capsys.readouterr()
    assert main(args) == 2
    assert "holds a deformable_detr model, but --model is detr_digits" in capsys.readouterr().err


def run_cli(args: list[str], launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python [launcher] -m detrkit args` on one thread, its output in ``stdout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *launcher, "-m", "detrkit", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training ended early:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not reach the expected point")
        time.sleep(0.05)


def test_killed_and_interrupted_runs_resume_to_the_same_weights(tmp_path):
    # The three runs start together and the two resumes run together: each is one-threaded and
    # mostly start-up, so on two cores this takes about half the time of running them in turn.
    # Batches grouped by aspect ratio, the default: its epochs resume at the right batch too.
    def args(run_dir, *extra):
        return tiny_args(run_dir, "--epochs", "3", "--group-by-aspect", *extra)

    reference = run_cli(args(tmp_path / "reference"))
    killed_dir = tmp_path / "killed"
    killed = run_cli(args(killed_dir))
    stopped_dir = tmp_path / "stopped"
    stopped = run_cli(args(stopped_dir))

    # SIGKILL right after the first epoch's checkpoint: nothing can be flushed or cleaned up.
    wait_for(lambda: (killed_dir / "checkpoint.pth").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    state = load_training_state(killed_dir / "checkpoint.pth")  # complete, never half-written
    assert state["epoch"] >= 1
    resumed_killed = run_cli(args(killed_dir, "--resume", "auto"))

    # SIGTERM in the middle of an epoch: a checkpoint at that batch, then an exact resume.
    metrics = stopped_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 6, stopped)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait() == 128 + signal.SIGTERM
    assert load_training_state(stopped_dir / "checkpoint.pth")["step"] >= 5
    resumed_stopped = run_cli(args(stopped_dir, "--resume", str(stopped_dir)))

    for process in (reference, resumed_killed, resumed_stopped):
        assert process.wait() == 0, process.stdout.read()
    expected = final_weights(tmp_path / "reference")
    assert_same_weights(final_weights(killed_dir), expected)
    assert_same_weights(final_weights(stopped_dir), expected)


def test_gradient_accumulation_windows_end_with_the_epoch_and_bound_a_stop(tmp_path, monkeypatch):
    """--grad-accum 2: an epoch cut short (here to 3 batches) steps on its last, lone batch
    rather than carrying its gradient into the next epoch; and a stop requested inside a window
    takes effect after the window, so the resumed run ends with the uninterrupted run's
    weights."""
    steps = []
    real_build = train_module.build_optimizer

    def counting_optimizer(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", counting_optimizer)
    cut = ["--grad-accum", "2", "--max-steps-per-epoch", "3", "--eval-every", "2"]
    assert main(tiny_args(tmp_path / "cut", *cut)) == 0
    assert len(steps) == 4  # per epoch: batches 1-2, then batch 3 alone

    class StopAfterFirstLook(train_module._StopRequest):
        """A SIGTERM that arrives while the first window's first batch trains."""

        looked = False

        @property
        def signal(self):
            answer = signal.SIGTERM if self.looked else None
            self.looked = True
            return answer

        @signal.setter
        def signal(self, value):
            pass

    one_epoch = ["--epochs", "1", "--grad-accum", "2"]
    assert main(tiny_args(tmp_path / "reference", *one_epoch)) == 0
    stopped_dir = tmp_path / "stopped"
    monkeypatch.setattr(train_module, "_StopRequest", StopAfterFirstLook)
    with pytest.raises(SystemExit) as stopped:
        main(tiny_args(stopped_dir, *one_epoch))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_training_state(stopped_dir / "checkpoint.pth")["batch_in_epoch"] == 2
    monkeypatch.undo()
    assert main(tiny_args(stopped_dir, *one_epoch, "--resume", str(stopped_dir))) == 0
    assert_same_weights(final_weights(stopped_dir), final_weights(tmp_path / "reference"))


def test_non_finite_loss_stops_training_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_build = train_module.build_criterion
    calls = {"n": 0}

    def poisoned(config):
        criterion = real_build(config)
        forward = criterion.forward

        def forward_with_nan(outputs, targets):
            calls["n"] += 1
            losses = forward(outputs, targets)
            if calls["n"] == 6:  # the second batch of epoch 2 (4 batches per epoch)
                losses["loss"] = losses["loss"] * float("nan")
            return losses

        criterion.forward = forward_with_nan
        return criterion

    monkeypatch.setattr(train_module, "build_criterion", poisoned)
    run_dir = tmp_path / "run"
    assert main(tiny_args(run_dir)) == 1
    message = capsys.readouterr().out
    assert "non-finite loss at step 5 (epoch 2, batch 1)" in message
    assert "loss=nan" in message
    assert load_training_state(run_dir / "checkpoint.pth")["epoch"] == 1


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    images_dir, annotations = write_square_coco(tmp_path)
    data = f"coco:{images_dir},{annotations},{images_dir},{annotations}"
    # Frozen batch norm and no dropout: per-process batch statistics and random streams differ.
    common = [
        "train",
        "--model",
        "deformable_detr_digits",
        "--data",
        data,
        "--epochs",
        "1",
        "--no-augment",
        "--image-scale",
        "0.08",
        "--workers",
        "0",
        "--deterministic",
        "--model-option=backbone_norm=frozen",
        "--model-option=dropout=0.0",
        *[f"--model-option={k}={v}" for k, v in TINY_MODEL.items()],
    ]
    # Both runs at once: each process is one-threaded and mostly start-up.
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531")
    runs = [
        run_cli([*common, "--batch-size", "2", "--output", str(tmp_path / "single")]),
        run_cli([*common, "--batch-size", "1", "--output", str(tmp_path / "ddp")], torchrun),
    ]
    for process in runs:
        output, _ = process.communicate()
        assert process.returncode == 0, output
    # Two steps of AdamW: sums in another order differ in the last bits only.
    assert_same_weights(
        final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), atol=1e-5
    )


def test_evaluation_equals_pycocotools_on_hand_made_predictions():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [10, 10, 30, 40],
                "area": 1200,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 9,
                "bbox": [50, 20, 20, 20],
                "area": 400,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 9, "name": "nine"}],
    }
    gt.createIndex()
    # Labels 0 and 1 stand for categories 7 and 9; boxes in x1, y1, x2, y2.
    detections = {
        1: {
            "boxes": torch.tensor([[12.0, 10.0, 40.0, 52.0], [60.0, 60.0, 90.0, 90.0]]),
            "labels": torch.tensor([0, 1]),
            "scores": torch.tensor([0.9, 0.4]),
        },
        2: {
            "boxes": torch.tensor([[50.0, 20.0, 70.0, 40.0]]),
            "labels": torch.tensor([0]),
            "scores": torch.tensor([0.8]),
        },
    }
    results = [r for i, d in detections.items() for r in to_coco_results(i, d, [7, 9])]
    assert results[0] == {
        "image_id": 1,
        "category_id": 7,
        "bbox": [12.0, 10.0, 28.0, 42.0],
        "score": 0.9,
    }
    ours = coco_metrics(gt, results)

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = [None if v < 0 else v for v in evaluator.stats]
    assert [ours[name] for name in COCO_METRICS] == pytest.approx(expected)
    assert 0 < ours["AP50"] < 1
    # No detections at all: 0 where there are objects, None for sizes with none (no large ones).
    nothing = coco_metrics(gt, [])
    assert nothing["AP"] == nothing["APs"] == nothing["AR100"] == 0.0
    assert nothing["APl"] is None and nothing["ARl"] is None


def test_distributed_evaluation_counts_each_image_once():
    """Five images over two processes: the sampler pads one share with a repeated image, whose
    detections (from the first process that saw it) must reach COCOeval once."""
    shares = [
        [i for batch in EpochBatches(range(5), 2, 0, False, 2, rank) for i in batch]
        for rank in range(2)
    ]
    assert sorted(shares[0] + shares[1]) == [0, 0, 1, 2, 3, 4]  # what the merge must undo
    parts = [
        [{"image_id": i, "score": 0.5 + rank / 10} for i in share for _ in range(2)]
        for rank, share in enumerate(shares)
    ]
    parts[1].append({"image_id": 9, "score": 0.1})  # an image only a later process has
    merged = merge_rank_results(parts)
    assert sorted(entry["image_id"] for entry in merged) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 9]
    assert all(e["score"] == 0.5 for e in merged if e["image_id"] in shares[0])


def test_unreadable_training_images_are_counted_in_the_log(tmp_path, capsys):
    images_dir, annotations = write_square_coco(tmp_path / "coco")
    (images_dir / "2.png").write_bytes(b"not a png")
    val_dir, val_annotations = write_square_coco(tmp_path / "val")
    data = f"coco:{images_dir},{annotations},{val_dir},{val_annotations}"
    args = [
        "train",
        "--model",
        "deformable_detr_digits",
        "--data",
        data,
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--image-scale",
        "0.08",
        "--workers",
        "0",
        *[f"--model-option={k}={v}" for k, v in TINY_MODEL.items()],
    ]
    with pytest.warns(UserWarning, match=r"2\.png"):
        assert main(args) == 0
    assert "epoch 1: 1 unreadable images skipped" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {"type": "data", "epoch": 1, "skipped_images": 1} in records

    # Validation images are all read or the evaluation fails: a skipped one would count its
    # objects as missed and the image read in its place twice.
    (val_dir / "3.png").unlink()
    args[args.index(str(tmp_path / "run"))] = str(tmp_path / "run2")
    assert main(args) == 2
    assert "are not there, e.g. 3.png" in capsys.readouterr().err


@pytest.mark.parametrize("preset", detrkit.available_models())
def test_every_trainable_parameter_takes_part_in_the_loss(preset):
    """Distributed training runs DDP with find_unused_parameters=False: a parameter that no loss
    reaches would make it fail, so every preset's trainable parameters must get a gradient."""
    torch.manual_seed(0)
    small = {"enc_layers": 1, "dec_layers": 2, "num_queries": 6, "dim_feedforward": 32}
    model = detrkit.build_model(preset, **small).train()
    images, mask = detrkit.pad_images([torch.randn(3, 96, 128), torch.randn(3, 80, 112)])
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2]] * 2)},
    ]
    # Masks for the panoptic models (the detectors' losses leave them aside).
    targets[0]["masks"] = (torch.rand(1, 96, 128) > 0.5).float()
    targets[1]["masks"] = (torch.rand(2, 80, 112) > 0.5).float()
    build_criterion(model.config)(model(images, mask), targets)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_the_predictions_picture_shows_each_images_own_detections(tmp_path, monkeypatch):
    # Deformable DETR's detections depend on an image's padding: the picture must show what
    # the model finds in each image alone (as `detrkit predict` runs it), whatever the other
    # images of the picture are.
    from detrkit.engine import visualize
    from detrkit.models import PostProcess

    torch.manual_seed(0)
    model = detrkit.build_model("deformable_detr_digits", **TINY_MODEL).eval()
    transforms = detrkit.data.make_val_transforms(detrkit.data.AugmentationConfig().scaled(0.12))
    dataset = detrkit.data.DigitsDetection("train", 3, transforms=transforms)
    sizes = {tuple(dataset[i][0].shape[-2:]) for i in range(3)}
    assert len(sizes) > 1, "the scenes should differ in size, so that a batch would pad them"
    drawn = []

    def record(pixels, boxes, captions, labels, min_side):
        drawn.append((pixels.shape[-2:], boxes.clone(), list(captions)))
        return pixels

    monkeypatch.setattr(visualize, "draw_detections", record)
    visualize.draw_predictions(model, dataset, tmp_path / "p.png", threshold=0.0)
    assert (tmp_path / "p.png").is_file()
    assert len(drawn) == 3
    postprocess = PostProcess.for_config(model.config)
    for index, (shape, boxes, captions) in enumerate(drawn):
        image, target = dataset[index]
        assert tuple(shape) == tuple(image.shape[-2:])
        with torch.no_grad():
            outputs = model(image[None], torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
        alone = postprocess(outputs, target["size"][None])[0]
        torch.testing.assert_close(boxes, alone["boxes"])
        assert len(captions) == len(alone["scores"])

"""The training loop: ``detrkit train`` runs :func:`train`.

Runs on one process or under torchrun (DistributedDataParallel), checkpoints atomically every few
epochs, at the end and on SIGINT/SIGTERM, and resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from detrkit.checkpoints.finite import NonFiniteError, require_finite_weights
from detrkit.checkpoints.load import (
    check_device,
    load_weights,
    read_checkpoint,
    training_run_config,
)
from detrkit.data import ImageReadError
from detrkit.data.digits import digit_crops
from detrkit.engine.config import DEFAULT_MODEL, DIGITS_DATA, TrainConfig
from detrkit.engine.datasets import SeededSamples, build_datasets, coco_ground_truth, make_loader
from detrkit.engine.distributed import ProcessInfo, any_process, barrier, init_distributed
from detrkit.engine.evaluate import amp_auto_note, amp_dtype, headline, score_dataset
from detrkit.engine.logger import MetricsLog, plot_metrics
from detrkit.engine.optim import build_optimizer
from detrkit.engine.pretrain import pretrain_backbone
from detrkit.engine.state import (
    CHECKPOINT_NAME,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from detrkit.engine.visualize import draw_predictions
from detrkit.fast import optimize_for_training
from detrkit.files import remove_temporaries, write_json
from detrkit.loss import build_criterion
from detrkit.loss.denoising import Denoiser
from detrkit.models import (
    DETRConfig,
    DETRSegmentation,
    DETRSegmentationConfig,
    PostProcess,
    build_config,
    model_from_config,
)
from detrkit.models.presets import closest_preset, override_config


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what is kept."""


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be written."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def new_run_dir(root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
        candidate = root / f"{stamp}{suffix}"
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"no free run directory under {root}")


# What a resumed run may change: how long it runs, where, and how often it reports.
RESUMABLE_CHANGES = ("epochs", "device", "workers", "log_every", "eval_every", "checkpoint_every")


def resumed_config(
    given: TrainConfig,
    stored: TrainConfig,
    epochs_done: int,
    names: Collection[str] | None = None,
) -> TrainConfig:
    """The interrupted run's config, with the changes ``given`` asks for where a resume allows
    them (:data:`RESUMABLE_CHANGES`; ``epochs`` extends or shortens the run). ``names``: the
    fields the caller set (None: those of ``given`` that differ from their default). Any other
    of them whose value differs from the stored run's is an error: silently ignored, it would
    make the resumed run other than the one asked for."""
    default = TrainConfig()
    if names is None:
        names = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(given, f.name) != getattr(default, f.name)
        ]
    changes, refused = {}, []
    for name in names:
        value = getattr(given, name)
        if name == "output" or value == getattr(stored, name):
            continue
        if name in RESUMABLE_CHANGES:
            changes[name] = value
        else:
            refused.append(f"{name}={value!r} (the run's: {getattr(stored, name)!r})")
    if refused:
        raise ValueError(
            "a resumed run keeps its config; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change, but these were given: "
            + "; ".join(refused)
        )
    if changes.get("epochs", epochs_done + 1) <= epochs_done:
        raise ValueError(
            f"epochs={changes['epochs']}: the run has already trained {epochs_done} epochs"
        )
    return dataclasses.replace(stored, **changes)


# What a run directory holds; a new run refuses a directory with any of them unless told to
# replace them.
RUN_FILES = (
    CHECKPOINT_NAME,
    "config.json",
    "metrics.jsonl",
    "eval_results.json",
    "metrics.png",
    "predictions.png",
)


def prepare_output(run_dir: Path, replace: bool) -> None:
    """Checks that a new run may write into ``run_dir``: refuses (naming it) a directory that
    holds an earlier run, unless ``replace``, which removes that run's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--output {run_dir}: exists and is not a directory")
    found = [run_dir / name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    if found and not replace:
        raise ValueError(
            f"--output {run_dir}: holds an earlier run ({', '.join(p.name for p in found)}); "
            f"continue it with --resume {run_dir}, choose a new --output, or give --overwrite "
            "to replace it"
        )
    for path in found:
        path.unlink()  # a link is removed, not followed


# A fine-tuning run takes these from the run that trained its source checkpoint, unless given:
# a model trained on small images without flips finds little when fine-tuned on large flipped ones.
FINETUNE_SETTINGS = ("image_scale", "augment", "batch_size")


def set_fields(config: TrainConfig, given: Collection[str] | None) -> set[str]:
    """The fields the user set: ``given`` when known, else those differing from the default."""
    if given is not None:
        return set(given)
    default = TrainConfig()
    return {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def finetune_config(
    config: TrainConfig, given: Collection[str] | None
) -> tuple[TrainConfig, list[str]]:
    """``config`` with the :data:`FINETUNE_SETTINGS` the user did not set taken from the
    training run of its ``finetune`` checkpoint, and lines saying what was taken and what the
    given options change from that run."""
    found = training_run_config(config.finetune) if config.finetune else None
    if found is None:
        return config, []
    source, where = found
    names = set_fields(config, given)
    taken = {
        name: source[name]
        for name in FINETUNE_SETTINGS
        if name in source and name not in names and source[name] != getattr(config, name)
    }
    differ = [
        f"{name}={getattr(config, name)!r} (the source run's: {source[name]!r})"
        for name in FINETUNE_SETTINGS
        if name in source and name in names and source[name] != getattr(config, name)
    ]
    lines = []
    if taken:
        listed = ", ".join(f"{name}={value!r}" for name, value in taken.items())
        lines.append(f"fine-tuning with the data settings of the source run ({where}): {listed}")
    if differ:
        lines.append("given options that differ from the source run: " + "; ".join(differ))
    return dataclasses.replace(config, **taken), lines


def _trains_masks(config: TrainConfig) -> bool:
    """Whether the run trains a model with masks: its data must then give them."""
    if config.model is not None:
        return isinstance(build_config(config.model), DETRSegmentationConfig)
    return isinstance(read_checkpoint(config.finetune)[1], DETRSegmentationConfig)


def build_training_model(config: TrainConfig, train_set, log) -> nn.Module:
    """The preset with the dataset's classes, or the fine-tuning checkpoint (new class head when
    the class count differs)."""
    num_classes = train_set.num_classes
    class_names = list(train_set.class_names)
    # The dataset's own category ids, so that predictions can be written and scored in them.
    category_ids = [int(i) for i in train_set.category_ids]
    options = {
        "num_classes": num_classes,
        "class_names": class_names,
        "category_ids": None if category_ids == list(range(num_classes)) else category_ids,
        **config.model_options,
    }
    if config.finetune:
        state_dict, base = read_checkpoint(config.finetune)
        target = build_config(config.model) if config.model is not None else base
        # The paper's panoptic recipe starts from a trained detector: its weights go under
        # `detr.`, the mask head starts new.
        detector_only = isinstance(target, DETRSegmentationConfig) and type(base) is DETRConfig
        if detector_only:
            try:
                base = DETRSegmentationConfig(**dataclasses.asdict(base))
            except ValueError as error:
                raise ValueError(
                    f"--finetune {config.finetune}: its detector cannot take a mask head: {error}"
                ) from None
        if target.model_type != base.model_type:
            raise ValueError(
                f"--finetune {config.finetune} holds a {base.model_type} model, but --model is "
                f"{config.model}: leave --model out (the checkpoint sets the model; "
                "--model-option changes its fields)"
            )
        model_config = override_config(base, str(config.finetune), **options)
        num_classes = model_config.num_classes
        reset = base.num_classes != num_classes
        if reset and config.freeze_detector:
            raise ValueError(
                f"--finetune {config.finetune} has {base.num_classes} classes and the data "
                f"{num_classes}: its class head would start new, and --freeze-detector would "
                "keep it untrained; fine-tune the detector on this data first, or leave out "
                "--freeze-detector"
            )
        model = model_from_config(model_config)
        loaded = model.detr if detector_only else model
        load_weights(loaded, state_dict, config.finetune, reset_class_head=reset)
        log(
            f"fine-tuning from {config.finetune}"
            + (" (the detector; the mask head starts new)" if detector_only else "")
            + (
                f": class head re-initialised ({base.num_classes} -> {num_classes} classes)"
                if reset
                else ""
            )
        )
    else:
        model = model_from_config(build_config(config.model, **options))
    things = getattr(train_set, "is_thing", None)
    if isinstance(model, DETRSegmentation) and things and "is_thing" not in config.model_options:
        # The dataset's stuff classes, which panoptic segmentation merges into one segment each.
        model.config.is_thing = [bool(thing) for thing in things]
    if config.freeze_detector:
        if not isinstance(model, DETRSegmentation):
            raise ValueError(
                f"--freeze-detector trains a panoptic model's mask head alone, but the model is "
                f"a {model.config.model_type} model, which has none"
            )
        for param in model.detr.parameters():
            param.requires_grad_(False)
        log("detector frozen: training the mask head alone")
    return model


def train(
    config: TrainConfig,
    resume: str | None = None,
    given: Collection[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Trains as ``config`` says; returns the run directory (checkpoint, metrics, plot, config).

    ``resume``: a run directory to continue (or "auto": ``config.output``'s, if it has a
    checkpoint). Its stored config then holds, with the changes :func:`resumed_config` allows
    among the fields named in ``given`` (the options a command line set; None: every field of
    ``config`` that differs from its default). A new run refuses an output directory that holds
    an earlier run unless ``overwrite`` (or ``resume="auto"``, which restarts a run killed
    before its first checkpoint)."""
    run_dir = Path(config.output) if config.output else new_run_dir()
    if resume and resume != "auto":
        run_dir = Path(resume)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    config.validate()
    check_device(config.device)
    state: dict[str, Any] | None = None
    finetune_notes: list[str] = []
    if resume and checkpoint_path.exists():
        state = load_training_state(checkpoint_path)
        stored = TrainConfig.from_dict(state["train_config"], str(checkpoint_path))
        config = resumed_config(config, stored, state["epoch"], given)
        if config.finetune:  # the checkpoint sets the model (older runs stored the default)
            config.model = None
    elif resume and resume != "auto":
        raise FileNotFoundError(f"--resume {resume}: no {CHECKPOINT_NAME} there")
    else:
        prepare_output(run_dir, replace=overwrite or resume == "auto")
        config, finetune_notes = finetune_config(config, given)
    if config.model is None and not config.finetune:
        if config.data not in DIGITS_DATA:
            raise ValueError(
                f"--model is needed for --data {config.data!r} (`detrkit models` lists the "
                f"presets; {DEFAULT_MODEL} is the default only for the built-in digits)"
            )
        config.model = DEFAULT_MODEL
    config.output = str(run_dir)

    # After the resume: the device is the run's, unless the resume changes it.
    process = init_distributed(config.device)
    device = torch.device(
        f"cuda:{process.local_rank}" if config.device == "cuda" else config.device
    )

    def log(message: str) -> None:
        if process.is_main:
            print(f"[detrkit] {message}", flush=True)

    if state is not None:
        log(f"resuming {run_dir} at epoch {state['epoch']}, batch {state['batch_in_epoch']}")
    for note in finetune_notes:
        log(note)

    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_set, val_set = build_datasets(config, masks=_trains_masks(config))
    # The papers' modules swapped for fast ones on the same parameters (detrkit.fast).
    model = optimize_for_training(build_training_model(config, train_set, log))
    config = config.resolved(model.config)
    config.validate()
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Left by a process killed while writing; nothing else writes here now.
        for path in remove_temporaries(run_dir):
            log(f"removed {path.name}, left by an interrupted write")
        write_json(run_dir / "config.json", config.to_dict(), indent=2)
    barrier()

    metrics = MetricsLog(run_dir, enabled=process.is_main)
    if state is not None:
        # Records logged after the checkpoint was written would come again, and a line torn by
        # the kill would glue onto the next one.
        metrics.keep_until(state["step"], state["epoch"])
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    autocast_dtype = amp_dtype(config.amp, device)
    if config.amp == "auto":
        log(amp_auto_note(device))
    if config.backbone_pretrain_steps:
        if state is None:
            _pretrain_backbone(model, config, metrics, log, autocast_dtype)
        # From here on the backbone is a pre-trained one, treated as the original recipe treats
        # ImageNet weights (also on resume, so that the checkpoint's layout matches).
        model.backbone[0].freeze_as_pretrained()
        model.config = dataclasses.replace(model.config, backbone_norm="frozen")
    if config.freeze_backbone:  # after its pre-training, which trains it
        for param in model.backbone.parameters():
            param.requires_grad_(False)
        log("backbone frozen")
    criterion = build_criterion(model.config).to(device)
    optimizer = build_optimizer(
        model, config.lr, config.lr_backbone, config.weight_decay, config.lr_linear_proj_mult
    )
    # Denoising training: its embeddings train with the model at its learning rate, and are kept
    # in the training checkpoint beside (not in) the model's weights.
    denoiser = None
    if config.denoising:
        denoiser = Denoiser(
            model.config, config.denoising, config.dn_label_noise, config.dn_box_noise
        ).to(device)
        optimizer.add_param_group(
            {"params": list(denoiser.parameters()), "lr": config.lr, "name": "denoising"}
        )
        log(
            f"denoising training: {config.denoising} groups, label noise {config.dn_label_noise}, "
            f"box noise {config.dn_box_noise}"
        )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_drop, gamma=0.1)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema_decay
        else None
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    start_epoch, start_batch, step = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        if denoiser is not None:
            denoiser.load_state_dict(state["denoising"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]

    trained = model
    if process.world_size > 1:
        trained = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Every trainable parameter takes part in the loss (test_engine checks each preset);
            # searching for unused ones costs a graph walk per step and floods the logs.
            find_unused_parameters=False,
        )
    if config.compile:
        # Evaluation and checkpoints keep using `model`, so state-dict keys stay unprefixed.
        trained = torch.compile(trained, dynamic=True)
    seeded_train = SeededSamples(train_set, config.seed)
    train_loader = make_loader(
        seeded_train,
        config.batch_size,
        config.seed,
        True,
        config.workers,
        process.world_size,
        process.rank,
        config.group_by_aspect,
    )
    val_loader = make_loader(
        val_set,
        config.batch_size,
        config.seed,
        False,
        config.workers,
        process.world_size,
        process.rank,
        config.group_by_aspect,
    )
    coco_gt = coco_ground_truth(val_set) if process.is_main else None
    postprocess = PostProcess.for_config(model.config)

    def save(epoch: int, batch_in_epoch: int) -> None:
        if not process.is_main:
            return
        # The weights can turn NaN at a step whose loss was still finite: such a checkpoint
        # must not replace the last good one.
        kept = [("weights", model)] + ([("averaged weights", ema)] if ema is not None else [])
        kept += [("denoising embeddings", denoiser)] if denoiser is not None else []
        for name, module in kept:
            try:
                require_finite_weights(module, f"step {step} (epoch {epoch + 1})")
            except NonFiniteError as error:
                raise TrainingError(
                    f"{error}; training stopped, the last good checkpoint {checkpoint_path} is "
                    f"kept ({name} not written)"
                ) from None
        save_training_state(
            checkpoint_path,
            {
                "model": model.state_dict(),
                "model_config": model.config.to_dict(),
                "train_config": config.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "denoising": denoiser.state_dict() if denoiser is not None else None,
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "rng": rng_state(),
            },
        )

    if config.model:
        what = config.model
    else:  # fine-tuning: the preset the checkpoint's model is closest to, and how it differs
        preset, differences = closest_preset(model.config)
        changed = ", ".join(f"{k}={v}" for k, v in differences.items() if k != "num_classes")
        what = f"{preset}{f' ({changed})' if changed else ''} from {config.finetune}"
    log(f"training {what} on {config.data} for {config.epochs} epochs -> {run_dir}")
    if state is not None:  # last, so that nothing set up above draws from the restored streams
        set_rng_state(state["rng"])
    with _StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs):
            seeded_train.epoch = epoch
            train_loader.batch_sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            step, interrupted_at = _train_one_epoch(
                trained,
                criterion,
                optimizer,
                scaler,
                ema,
                train_loader,
                config,
                device,
                autocast_dtype,
                epoch,
                step,
                metrics,
                stop,
                process,
                first_batch=start_batch if epoch == start_epoch else 0,
                denoiser=denoiser,
            )
            if interrupted_at is not None:
                save(epoch, interrupted_at)
                barrier()  # no process leaves (and so ends the run) before the checkpoint is out
                # The processes stop together, also those the signal did not reach.
                received = stop.signal or signal.SIGTERM
                log(f"stopped by signal {received}: checkpoint written to {checkpoint_path}")
                raise SystemExit(128 + received)
            scheduler.step()
            last = epoch + 1 == config.epochs
            if last or (epoch + 1) % config.eval_every == 0:
                try:
                    evaluate_epoch(
                        ema.module if ema is not None else model,
                        val_loader,
                        val_set,
                        coco_gt,
                        postprocess,
                        device,
                        autocast_dtype,
                        epoch,
                        metrics,
                        run_dir,
                        process,
                        log,
                    )
                except ImageReadError:  # a validation image: keep the epoch just trained
                    save(epoch + 1, 0)
                    raise
                except NonFiniteError as error:
                    raise TrainingError(
                        f"evaluation after epoch {epoch + 1}: {error}; training stopped, the "
                        f"last good checkpoint {checkpoint_path} is kept"
                    ) from None
            if last or (epoch + 1) % config.checkpoint_every == 0:
                save(epoch + 1, 0)
    if process.is_main:
        plot_metrics(metrics.read(), run_dir / "metrics.png")
        draw_predictions(
            ema.module if ema is not None else model, val_set, run_dir / "predictions.png"
        )
        outputs = ", ".join(
            str(run_dir / name)
            for name in (CHECKPOINT_NAME, "metrics.jsonl", "metrics.png", "predictions.png")
        )
        log(f"done: {outputs}")
    barrier()
    return run_dir


def _pretrain_backbone(
    model: nn.Module, config: TrainConfig, metrics: MetricsLog, log, autocast_dtype
) -> None:
    """Classification pre-training of the backbone on the training split's digit crops."""
    scenes = config.backbone_pretrain_images or config.digits_train
    crops, labels = digit_crops("train", scenes, config.seed)
    log(
        f"pre-training the backbone for {config.backbone_pretrain_steps} steps on "
        f"{len(crops)} digit crops of {scenes} training scenes"
    )

    def record(values: dict[str, float]) -> None:
        metrics.write({"type": "pretrain", **values})

    accuracy = pretrain_backbone(
        model.backbone[0],
        crops,
        labels,
        config.backbone_pretrain_steps,
        seed=config.seed,
        log=record,
        autocast_dtype=autocast_dtype,
    )
    log(f"backbone pre-trained: {accuracy:.0%} of the last training crops classified right")


def _train_one_epoch(
    model,
    criterion,
    optimizer,
    scaler,
    ema,
    loader,
    config: TrainConfig,
    device,
    autocast_dtype,
    epoch: int,
    step: int,
    metrics: MetricsLog,
    stop: _StopRequest,
    process: ProcessInfo,
    first_batch: int = 0,
    denoiser: Denoiser | None = None,
) -> tuple[int, int | None]:
    """One pass over ``loader``. Returns the global step reached and, if a stop signal arrived,
    the index of the first batch not trained on (None otherwise). ``denoiser``: denoising
    training's queries are made by it for every batch."""
    from tqdm import tqdm

    model.train()
    if config.freeze_backbone or config.freeze_detector:  # keep batch-norm statistics frozen too
        (model.module if hasattr(model, "module") else model).backbone.eval()
    total = len(loader)
    if config.max_steps_per_epoch is not None:
        total = min(total, max(0, config.max_steps_per_epoch - first_batch))
    progress = tqdm(
        total=total,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not process.is_main,
        dynamic_ncols=True,
    )
    batch_index = first_batch
    end = first_batch + total  # the index of the batch after the epoch's last
    skipped_images = 0
    for images, mask, targets in loader:
        if progress.n >= total:
            break
        # Honoured between accumulation windows only, and by all processes at once: the
        # checkpoint then holds no half-accumulated gradient, and a resume repeats the run.
        at_window_start = batch_index % config.grad_accum == 0
        if at_window_start and any_process(stop.signal is not None, device):
            progress.close()
            return step, batch_index
        skipped_images += sum(int(t.get("skipped", 0)) for t in targets)
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if denoiser is None:
                outputs = model(images, mask)
            else:
                detector = model.module if hasattr(model, "module") else model
                denoising = denoiser(detector, targets)  # None for a batch without objects
                outputs = model(images, mask, denoising=denoising)
        if denoiser is None:
            losses = criterion(outputs, targets)
        else:
            losses = criterion(outputs, targets, denoising=denoising)
        loss = losses["loss"]
        if any_process(not bool(torch.isfinite(loss)), device):
            progress.close()
            raise TrainingError(
                f"non-finite loss at step {step} (epoch {epoch + 1}, batch {batch_index}); "
                "training stopped, the last good checkpoint is kept (this process's losses: "
                f"{', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())})"
            )
        scaler.scale(loss / config.grad_accum).backward()
        batch_index += 1
        # The last window of an epoch (cut short by its end or max_steps_per_epoch) steps too:
        # its gradient must not carry over into the next epoch.
        if batch_index % config.grad_accum == 0 or batch_index == end:
            trained_parameters = list(model.parameters())
            if denoiser is not None:
                if process.world_size > 1:
                    _average_gradients(denoiser)  # not under DistributedDataParallel
                trained_parameters += list(denoiser.parameters())
            scaler.unscale_(optimizer)
            if config.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained_parameters, config.clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model.module if hasattr(model, "module") else model)
        step += 1
        lr = optimizer.param_groups[0]["lr"]
        progress.update()
        if step % config.log_every == 0 or progress.n == total:
            values = _final_layer_values(losses)
            progress.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.1e}")
            metrics.write({"type": "train", "epoch": epoch + 1, "step": step, "lr": lr, **values})
    progress.close()
    if skipped_images:
        if process.is_main:
            print(f"[detrkit] epoch {epoch + 1}: {skipped_images} unreadable images skipped")
        metrics.write({"type": "data", "epoch": epoch + 1, "skipped_images": skipped_images})
    return step, None


def _average_gradients(module: nn.Module) -> None:
    """Averages ``module``'s gradients over the processes (a missing one counts as zero)."""
    for parameter in module.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= dist.get_world_size()


def evaluate_epoch(
    model,
    loader,
    dataset,
    coco_gt,
    postprocess,
    device,
    autocast_dtype,
    epoch: int,
    metrics: MetricsLog,
    run_dir: Path,
    process: ProcessInfo,
    log,
) -> dict[str, float | None]:
    """COCO AP on the validation set; rank 0 logs it and writes the results file."""
    category_ids = getattr(dataset, "category_ids", None)
    if getattr(dataset, "label_mapping", "contiguous") == "coco":
        category_ids = None
    loader.batch_sampler.set_epoch(0)
    numbers, results = score_dataset(
        model, loader, dataset, coco_gt, postprocess, category_ids, device, autocast_dtype
    )
    if not process.is_main:
        return {}
    metrics.write({"type": "eval", "epoch": epoch + 1, **numbers})
    write_json(run_dir / "eval_results.json", results)
    log(f"epoch {epoch + 1}: {headline(numbers)}")
    return numbers


def _final_layer_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The losses and metrics of the final layer (auxiliary ``_0``.. and ``_enc`` left out)."""
    return {
        name: round(value.item(), 5)
        for name, value in losses.items()
        if not (name.rsplit("_", 1)[-1].isdigit() or name.endswith("_enc"))
    }

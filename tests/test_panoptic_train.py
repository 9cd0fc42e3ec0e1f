"""DETR's panoptic model in training and evaluation: post-processing, panoptic quality, mask AP,
detrkit train with masks and --freeze-detector, detrkit eval."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import detrkit
from detrkit.cli.main import main
from detrkit.engine.evaluate import PanopticScore, merge_image_counts, panoptic_pairs
from detrkit.models.postprocess import instance_masks, panoptic_segmentation

# --- panoptic quality ------------------------------------------------------------------------


def random_panoptic(generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """[size, size, 2] (category, segment) of blocky segments: categories 0-3 things (two
    instances each at most), 4-5 stuff (instance 0)."""
    category = torch.randint(0, 6, (4, 4), generator=generator)
    category = category.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1)
    instance = torch.randint(1, 3, (size, size), generator=generator)
    instance[category >= 4] = 0
    return torch.stack([category, instance], dim=-1)


def test_panoptic_quality_equals_torchmetrics_where_no_prediction_is_void():
    from torchmetrics.detection import PanopticQuality

    generator = torch.Generator().manual_seed(0)
    things, stuff = [0, 1, 2, 3], [4, 5]
    for _trial in range(6):
        reference = PanopticQuality(
            things=set(things), stuffs=set(stuff), return_sq_and_rq=True, return_per_class=True
        )
        ours = PanopticScore(things, stuff)
        for image in range(3):
            target = random_panoptic(generator)
            prediction = target.clone()
            noise = torch.rand(16, 16, generator=generator) < 0.35
            prediction[noise] = random_panoptic(generator)[noise]
            if image == 1:  # void truth: left out of the unions; -1 is no category of theirs
                target[:5, :7] = torch.tensor([-1, 0])
            reference.update(prediction[None], target[None])
            ours.update(prediction, target)
        per_class = reference.compute()  # [classes, 3]: PQ, SQ, RQ; things first
        _, tp, fp, fn = ours.stats
        counted = (tp + fp + fn) > 0
        numbers = ours.compute()
        groups = {"": slice(None), "_th": slice(0, 4), "_st": slice(4, None)}
        for suffix, group in groups.items():
            present = counted[group]
            for column, name in enumerate(("PQ", "SQ", "RQ")):
                expected = per_class[group][present, column].mean().item()
                # torchmetrics sums IoUs in float32
                assert numbers[f"{name}{suffix}"] == pytest.approx(expected, abs=1e-6)


def test_panoptic_quality_counts_as_panopticapi_where_predictions_are_void():
    score = PanopticScore(things=[3], stuff=[10])
    target = torch.zeros(20, 20, 2, dtype=torch.int64)
    target[..., 0] = 10
    target[:5, :5] = torch.tensor([3, 1])
    nothing = torch.full((20, 20, 2), -1)
    score.update(nothing, target)
    # Both true segments are missed: false negatives, not ignored (torchmetrics ignores them).
    assert score.stats[3].tolist() == [1, 1] and score.compute()["PQ"] == 0.0
    # A predicted segment lying mostly on void truth is no false positive; one that does not is.
    target2 = target.clone()
    target2[10:, 10:] = torch.tensor([-1, 0])
    prediction = target2.clone()
    prediction[10:, 10:] = torch.tensor([3, 7])  # all on void
    prediction[12:, :4] = torch.tensor([3, 8])  # on the stuff
    before = score.stats.clone()
    score.update(prediction, target2)
    added = score.stats - before
    assert added[2].tolist() == [1, 0]  # one false positive thing (segment 8), not segment 7
    assert added[1].tolist() == [1, 1]  # the thing and the stuff are matched
    stuff_pixels = int((target2[..., 0] == 10).sum())
    kept = stuff_pixels - 32  # segment 8 took 8 x 4 stuff pixels
    assert added[0, 1].item() == pytest.approx(kept / stuff_pixels)
    # The same pairs through panoptic_pairs: ids 0 are void.
    ids = torch.tensor([[0, 1], [2, 2]])
    pairs = panoptic_pairs(ids, [{"id": 1, "label": 0}, {"id": 2, "label": 1}], [5, 9])
    assert pairs.tolist() == [[[-1, 0], [5, 1]], [[9, 2], [9, 2]]]


# --- post-processing -------------------------------------------------------------------------


def test_panoptic_segmentation_follows_the_originals_rules():
    num_classes = 3  # 0, 1 things; 2 stuff
    is_thing = [True, True, False]
    logits = torch.full((5, num_classes + 1), -10.0)
    logits[0, 0] = 10  # a thing
    logits[1, 2] = 10  # stuff
    logits[2, 2] = 10  # the same stuff: merged with query 1
    logits[3, 1] = 10  # a thing whose mask wins a single pixel: dropped
    logits[4, 3] = 10  # "no object": never a segment
    masks = torch.zeros(5, 8, 8)
    masks[0, :4, :4] = 5
    masks[1, 4:, :] = 5
    masks[2, :4, 4:] = 5
    masks[3, 0, 5] = 9
    masks[4] = 100  # the strongest mask, of a query that is not kept
    ids, segments = panoptic_segmentation(
        logits, masks, is_thing, input_size=(32, 32), image_size=(32, 32), orig_size=(8, 8)
    )
    assert [(s["id"], s["label"], s["isthing"]) for s in segments] == [
        (1, 0, True),
        (2, 2, False),
    ]
    assert ids.shape == (8, 8) and set(ids.unique().tolist()) <= {1, 2}
    assert [s["area"] for s in segments] == [int((ids == s["id"]).sum()) for s in segments]
    assert sum(s["area"] for s in segments) == 8 * 8
    # The thing holds its own quarter: pixel assignment follows the highest mask logit.
    assert (ids[:4, :4] == 1).all() and (ids[4:] == 2).all()
    assert segments[1]["score"] == pytest.approx(F.softmax(logits[1], -1).max().item())
    # Nothing kept: every pixel 0, no segment.
    ids, segments = panoptic_segmentation(
        logits, masks, is_thing, (32, 32), (32, 32), (8, 8), threshold=1.0
    )
    assert segments == [] and (ids == 0).all()


def test_instance_masks_cut_the_padding_before_resizing():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 12, generator=generator)
    # This image filled [24, 40] of a [40, 48] batch; alone, its stride-4 logits would be the
    # corresponding part, interpolated to its own size.
    padded = instance_masks(logits, torch.tensor([2, 0]), (40, 48), (24, 40), (48, 80))
    assert padded.shape == (2, 48, 80) and padded.dtype == torch.bool
    full = F.interpolate(logits[None], size=(40, 48), mode="bilinear", align_corners=False)[0]
    expected = F.interpolate(
        (full[[2, 0], :24, :40].sigmoid() > 0.5).float()[None], size=(48, 80), mode="nearest"
    )[0].bool()
    assert torch.equal(padded, expected)


# --- training and evaluation -----------------------------------------------------------------

PANOPTIC_TINY = ["--model-option=num_queries=6", "--model-option=dim_feedforward=64"]


def panoptic_args(output, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "detr_digits_panoptic",
        "--output",
        str(output),
        "--digits-train",
        "6",
        "--digits-val",
        "3",
        "--batch-size",
        "3",
        "--image-scale",
        "0.15",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--log-every",
        "1",
        *PANOPTIC_TINY,
        *extra,
    ]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_with_masks_logs_mask_ap_and_pq_and_eval_reproduces_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*panoptic_args(run_dir), "--data", "digits"]) == 0
    logged = records(run_dir)
    train = [r for r in logged if r["type"] == "train"]
    assert train and all("loss_mask" in r and "loss_dice" in r for r in train)
    (evaluation,) = [r for r in logged if r["type"] == "eval"]
    for name in ("AP", "mask_AP", "mask_AP50", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert name in evaluation, name
    # A random model finds no digit, but the canvas is one segment of every image: PQ counts it.
    assert evaluation["PQ"] is not None and evaluation["PQ_st"] is not None
    assert "mask_AP" in capsys.readouterr().out
    model = detrkit.load(run_dir / "checkpoint.pth")
    assert model.config.class_names == [*map(str, range(10)), "canvas"]

    out = tmp_path / "eval"
    weights = str(run_dir / "checkpoint.pth")
    assert main(["eval", "--weights", weights, "--data", "digits", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {k: v for k, v in evaluation.items() if k not in ("type", "epoch")}
    results = json.loads((out / "results.json").read_text())
    assert results and all("segmentation" in r for r in results)


def test_freeze_detector_trains_the_mask_head_alone(tmp_path, capsys):
    # The paper's recipe: a detector of the panoptic classes (here saved untrained: what
    # matters is which weights move), then the mask head alone.
    torch.manual_seed(0)
    detector = detrkit.build_model(
        "detr_digits", nheads=8, num_classes=11, num_queries=6, dim_feedforward=64
    )
    detector_path = detrkit.save(detector, tmp_path / "detector")
    masks_dir = tmp_path / "masks"
    args = panoptic_args(masks_dir, "--data", "digits-panoptic", "--freeze-detector")
    assert main([*args, "--finetune", str(detector_path)]) == 0
    out = capsys.readouterr().out
    assert "the mask head starts new" in out and "detector frozen" in out
    trained = detrkit.load(masks_dir / "checkpoint.pth")
    for name, value in detector.state_dict().items():
        assert torch.equal(trained.state_dict()[f"detr.{name}"], value), name
    fresh = detrkit.build_model("detr_digits_panoptic", num_queries=6, dim_feedforward=64)
    changed = [
        name
        for name, value in trained.state_dict().items()
        if not name.startswith("detr.") and not torch.equal(value, fresh.state_dict()[name])
    ]
    assert any(name.startswith("mask_head.") for name in changed)
    assert any(name.startswith("bbox_attention.") for name in changed)
    (evaluation,) = [r for r in records(masks_dir) if r["type"] == "eval"]
    assert evaluation["PQ"] is not None

    # Errors, each one line before anything is written. A detector of the 10 digits would
    # start the panoptic model (11 classes) with a new class head, which a frozen detector
    # never trains.
    ten = detrkit.save(detrkit.build_model("detr_digits", nheads=8), tmp_path / "ten")
    wrong_classes = panoptic_args(tmp_path / "x", "--data", "digits", "--freeze-detector")
    assert main([*wrong_classes, "--finetune", str(ten)]) == 2
    error = capsys.readouterr().err
    assert "has 10 classes and the data 11" in error and "--freeze-detector" in error
    assert not (tmp_path / "x" / "checkpoint.pth").exists()
    # detr_digits' 4 heads do not fit the mask head.
    four = detrkit.save(detrkit.build_model("detr_digits", num_classes=11), tmp_path / "four")
    assert main(panoptic_args(tmp_path / "z", "--data", "digits", "--finetune", str(four))) == 2
    error = capsys.readouterr().err
    assert f"--finetune {four}: its detector cannot take a mask head" in error
    assert "nheads 4" in error
    not_panoptic = panoptic_args(tmp_path / "y", "--freeze-detector")
    not_panoptic[not_panoptic.index("detr_digits_panoptic")] = "detr_digits"
    assert main(not_panoptic) == 2
    assert "has none" in capsys.readouterr().err


def test_an_image_scored_twice_counts_once_also_across_processes():
    target = torch.zeros(8, 8, 2, dtype=torch.int64)
    target[..., 0] = 10
    target[:3, :3] = torch.tensor([3, 1])
    missed = torch.full((8, 8, 2), -1)  # two false negatives
    once = PanopticScore(things=[3], stuff=[10])
    once.update(target, target, image_id=1)
    once.update(missed, target, image_id=2)
    expected = once.compute()
    assert 0 < expected["PQ"] < 1
    # The same image again in this process (a sampler's padding) changes nothing.
    again = PanopticScore(things=[3], stuff=[10])
    for image_id, prediction in ((1, target), (2, missed), (1, target), (2, missed)):
        again.update(prediction, target, image_id=image_id)
    assert again.compute() == expected
    # Two processes' counts, image 2 scored by both: merged, it counts once, the first one's.
    first, second = PanopticScore([3], [10]), PanopticScore([3], [10])
    first.update(target, target, image_id=1)
    first.update(missed, target, image_id=2)
    second.update(target, target, image_id=2)  # another process's copy, not taken
    merged = merge_image_counts([first.per_image, second.per_image])
    assert merged.keys() == {1, 2} and merged[2] is first.per_image[2]
    # Without ids every call counts, as before.
    plain = PanopticScore([3], [10])
    for prediction in (target, missed, missed):
        plain.update(prediction, target)
    assert plain.stats[3].sum() == 4


def _score_in_process(rank: int, init: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    target = torch.zeros(8, 8, 2, dtype=torch.int64)
    target[..., 0] = 10
    target[:3, :3] = torch.tensor([3, 1])
    missed = torch.full((8, 8, 2), -1)
    score = PanopticScore(things=[3], stuff=[10])
    # Rank 0 scores images 1 and 2; rank 1 image 3 and, as a sampler's padding, image 2 again
    # (rank 0's copy is the one taken).
    for image_id, prediction in ([(1, target), (2, missed)], [(3, target), (2, target)])[rank]:
        score.update(prediction, target, image_id=image_id)
    results[rank] = score.compute()
    dist.destroy_process_group()


def test_distributed_panoptic_quality_counts_each_image_once(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_score_in_process, args=(f"file://{tmp_path}/init", results), nprocs=2)
    target = torch.zeros(8, 8, 2, dtype=torch.int64)
    target[..., 0] = 10
    target[:3, :3] = torch.tensor([3, 1])
    alone = PanopticScore(things=[3], stuff=[10])
    for image_id, prediction in ((1, target), (2, torch.full((8, 8, 2), -1)), (3, target)):
        alone.update(prediction, target, image_id=image_id)
    assert results[0] == results[1] == alone.compute()

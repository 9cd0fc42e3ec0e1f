"""Run outputs: metrics.jsonl (one JSON object per logged step or evaluation) and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detrkit.files import append_line, write_atomically, write_text


class MetricsLog:
    """Appends JSON lines to ``run_dir/metrics.jsonl``; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))

    def read(self) -> list[dict[str, Any]]:
        """The records, without a last line torn by a process killed while writing it."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # torn: the record was never completed
            if isinstance(record, dict):
                records.append(record)
        return records

    def keep_until(self, step: int, epoch: int) -> None:
        """Rewrites the log with the records of the run up to a checkpoint (``step`` steps,
        ``epoch`` epochs done) only: a resumed run logs what came after it again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            record
            for record in self.read()
            if (record.get("step", 0) <= step and record.get("epoch", 0) <= epoch)
            or record.get("type") == "pretrain"  # done once, before any checkpoint
        ]
        write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))


def plot_metrics(records: list[dict[str, Any]], path: Path) -> Path:
    """Training loss and validation AP / AP50 against steps and epochs, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    figure, (loss_axis, ap_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="total loss")
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            if name in train[0]:
                loss_axis.plot([r["step"] for r in train], [r[name] for r in train], label=name)
        loss_axis.set_yscale("log")
    loss_axis.set(title="Training loss", xlabel="step")
    loss_axis.legend()
    for name in ("AP", "AP50", "AP75"):
        points = [(r["epoch"], r[name]) for r in evals if r.get(name) is not None]
        if points:
            ap_axis.plot(*zip(*points), marker="o", label=name)
    ap_axis.set(title="Validation COCO AP", xlabel="epoch", ylim=(0, 1))
    ap_axis.legend()
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path

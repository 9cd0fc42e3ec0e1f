"""Run outputs: metrics.jsonl (one JSON object per logged step or evaluation) and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends JSON lines to ``run_dir/metrics.jsonl``; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

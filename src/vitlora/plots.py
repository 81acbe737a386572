"""training_curves.png: loss and accuracy per epoch, so a user sees over/under-fitting at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rundir import write_bytes_atomic


def plot_training_curves(epochs: list[dict[str, Any]], path: str | Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["epoch"] for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax_loss.plot(xs, [e.get("train_loss") for e in epochs], "o-", label="train loss")
    if any(e.get("val_loss") is not None for e in epochs):
        ax_loss.plot(xs, [e.get("val_loss") for e in epochs], "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    if any(e.get("val_accuracy") is not None for e in epochs):
        ax_acc.plot(xs, [e.get("val_accuracy") for e in epochs], "o-", color="tab:green", label="val accuracy")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())

"""Plots: training_curves.png (loss and accuracy per epoch, over/under-fitting at a glance) and the
reliability diagram `vitlora eval` writes (accuracy against the top-1 score per bin: honest
probabilities lie on the diagonal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rundir import write_bytes_atomic


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_reliability(bins: list[dict[str, Any]], ece: float, n: int, path: str | Path) -> None:
    """Reliability diagram from `metrics.reliability_bins`: accuracy per score bin against the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    full = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="tab:red", ms=3,
            label="mean score")
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 score", ylabel="accuracy",
           title=f"reliability: ECE {ece:.3f} on {n} images")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def plot_training_curves(epochs: list[dict[str, Any]], path: str | Path) -> None:
    plt = _pyplot()

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
    _save(fig, path)

"""Loss curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
import os


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    from .atomic import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_curves(series: dict[str, tuple[list, list]], path: str, title: str = "", ylabel: str = "loss",
                log_y: bool = False) -> str:
    """series: {label: (x values, y values)} -> a PNG at `path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_panels(panels: dict[str, dict[str, tuple[list, list]]], path: str, ylabel: str = "validation loss") -> str:
    """One subplot per panel title, each with its {label: (x, y)} series, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4 * rows), dpi=110, squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, marker="o", markersize=2.5, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> str:
    """Train and validation loss of a run's metrics.jsonl."""
    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return plot_curves({"train": tuple(map(list, zip(*train))) if train else ([], []),
                        "validation": tuple(map(list, zip(*val))) if val else ([], [])}, png_path, title)

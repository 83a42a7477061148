"""Figures people would rather look at than read: gate heatmaps (paper Fig. 3) and loss by segment."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402

from infini_bench.paper import length_label  # noqa: E402


def gate_heatmap(gates: torch.Tensor, path: Path, title: str = "sigmoid(beta) per layer and head") -> Path:
    """gates (L, H) in [0, 1]: 0 = local attention only, 1 = memory only."""
    fig, ax = plt.subplots(figsize=(max(4, gates.shape[1] * 0.35 + 2), max(3, gates.shape[0] * 0.3 + 1.5)))
    im = ax.imshow(gates.cpu().numpy(), vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="memory weight")
    return _save(fig, path)


def line_plot(series: dict[str, list[float]], path: Path, xlabel: str, ylabel: str, title: str,
              x: list[float] | None = None, logx: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(x if x is not None else range(len(ys)), ys, marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: length_label(int(v))))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Figures people would rather look at than read: gate heatmaps (paper Fig. 3), loss by segment, loss curves;
each memory has one colour in all of them (`memory_color`)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.axes  # noqa: E402
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402

from infini_bench.paper import length_label  # noqa: E402
from infini_bench.files import follow_umask  # noqa: E402


def gate_heatmap(gates: torch.Tensor, path: Path, title: str = "sigmoid(beta) per layer and head",
                 layers: list[int] | None = None) -> Path:
    """gates (L, H) in [0, 1]: 0 = local attention only, 1 = memory only. The colour scale is the whole range
    0-1 (white at 0.5, where every gate starts), so figures compare and noise near 0.5 stays pale; each cell
    shows its value, and the ticks are whole layers and heads; `layers` names the rows when only some layers
    have a gate (Memorizing Transformers: one)."""
    values = gates.detach().float().cpu()
    n_layers, n_heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4, n_heads * 0.45 + 2), max(3, n_layers * 0.35 + 1.5)))
    im = ax.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="coolwarm", aspect="auto")
    if n_layers * n_heads <= 512:  # beyond that the numbers would not be legible
        for i in range(n_layers):
            for j in range(n_heads):
                ax.text(j, i, f"{float(values[i, j]):.2f}", ha="center", va="center", fontsize=6)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if layers is not None:
        ax.set_yticks(range(n_layers), [str(i) for i in layers])
    else:
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="memory weight")
    return save_figure(fig, path)


# One colour per memory, the same in every figure of the report, so a memory is recognised at a glance; a
# memory without one here is drawn in black.
MEMORY_COLORS = {"none": "tab:gray", "linear": "tab:blue", "delta": "tab:orange", "full": "tab:brown",
                 "txl": "tab:green", "memorizing": "tab:red", "rmt": "tab:purple"}
# Lines of one colour in one panel (two seeds of a memory) differ in style and marker.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


LEGEND_INSIDE = 6  # a line plot with more series than this has its legend beside the axes


def memory_color(memory: str) -> str:
    """The colour of a memory in every figure of the report."""
    return MEMORY_COLORS.get(memory, "black")


def draw_lines(ax: matplotlib.axes.Axes, series: dict[str, list[float | None]],
               x: list[float] | dict[str, list[float]] | None = None, memories: dict[str, str] | None = None) -> None:
    """One line per series (None: no point); `x` is shared, or one list per series, or 0, 1, ...; `memories`
    names the memory of each series, which gives it its colour (else matplotlib's colour cycle)."""
    drawn: dict[str | None, int] = {}  # lines drawn so far in each memory's colour
    for label, ys in series.items():
        xs = x.get(label) if isinstance(x, dict) else x
        ys = [float("nan") if y is None else y for y in ys]
        color = memory_color(memories[label]) if memories and label in memories else None
        k = drawn.get(color, 0) if color else 0  # the colour cycle tells apart lines of no memory
        drawn[color] = k + 1
        ax.plot(xs if xs is not None else range(len(ys)), ys, color=color, linestyle=LINESTYLES[k % len(LINESTYLES)],
                marker=MARKERS[k % len(MARKERS)], markersize=3, label=label)


def line_plot(series: dict[str, list[float | None]], path: Path, xlabel: str, ylabel: str, title: str,
              x: list[float] | dict[str, list[float]] | None = None, logx: bool = False,
              ymin: float | None = None, ymax: float | None = None, memories: dict[str, str] | None = None,
              references: dict[str, list[float | None]] | None = None) -> Path:
    """One line per series (`draw_lines`); `ymin` anchors the y axis (e.g. 0 for ROUGE), `ymax` cuts it (points
    above it are off the plot). `references` are bounds no model drew (an oracle's scores; `x` as for a series):
    black and grey dotted lines, so they read as the frame of the model lines, not as models."""
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_lines(ax, series, x, memories)
    references = references or {}
    for k, (label, ys) in enumerate(references.items()):
        xs = x.get(label) if isinstance(x, dict) else x
        ax.plot(xs if xs is not None else range(len(ys)), [float("nan") if y is None else y for y in ys],
                color=("black", "grey", "silver")[k % 3], linestyle=":", marker="x", markersize=4, label=label)
    lines = len(series) + len(references)
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: length_label(int(v))))
    elif x is None:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if ymin is not None:
        ax.set_ylim(bottom=ymin)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines > LEGEND_INSIDE:  # beside the axes, where it hides no line
        fig.set_size_inches(9, 4.5)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    elif lines > 1:
        ax.legend()
    return save_figure(fig, path)


def panels_plot(panels: dict[str, dict[str, list[float | None]]], path: Path, xlabel: str, ylabel: str, title: str,
                memories: dict[str, str] | None = None, x: dict[str, list[float]] | None = None) -> Path:
    """One panel per entry of `panels`, titled by its key, with one line per series against `x` (one list per
    series) or 0, 1, ... (`draw_lines`) and its legend beside it; two panels to a row."""
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 4 * rows), squeeze=False, layout="constrained")
    for ax, (name, series) in zip(axes.flat, panels.items()):
        draw_lines(ax, series, x, memories)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    for ax in axes.flat[len(panels):]:  # an odd number of panels leaves the last cell empty
        ax.remove()
    fig.suptitle(title)
    return save_figure(fig, path)


# Accuracy by distance: bins 0, 1, 2-3, 4-7, ... segments, as the passkey and recall tasks record them.


def distance_bin(row: dict) -> int:
    """The power-of-two bin of a by-distance row (0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...): passkey's rows give
    their range in numbers, recall's as a label ("2-3")."""
    low = row["segments_back_min"] if "segments_back_min" in row else int(str(row["segments_back"]).split("-")[0])
    return int(low).bit_length()


def distance_label(k: int) -> str:
    """Bin k's tick: "0", "1", "2-3", "4-7", ..."""
    return str(k) if k < 2 else f"{2 ** (k - 1)}-{2 ** k - 1}"


def distance_axis(bins: list[int], first: int = 0) -> list[int]:
    """Every bin from `first` up to the largest of `bins`, filled or not: figures put each bin at its own place,
    so an empty one is a gap in the line with its tick labelled, not two distances drawn as neighbours."""
    return list(range(first, max(bins, default=first - 1) + 1))


def distance_ticks(ax: matplotlib.axes.Axes, axis: list[int], xlabel: str) -> None:
    """The bins' ticks at 0, 1, ... (slanted when many, or when wide labels such as 32-63 would touch) and the x
    label."""
    labels = [distance_label(k) for k in axis]
    crowded = len(axis) > 8 or (len(axis) > 5 and max(map(len, labels)) > 3)
    slant = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if crowded else {}
    ax.set_xticks(range(len(axis)), labels, **slant)
    ax.set_xlim(-0.5, len(axis) - 0.5)
    ax.set_xlabel(xlabel)


def percent_heatmap(grid: list[list[float]], rows: list[str], columns: list[str], path: Path, xlabel: str,
                    ylabel: str, title: str, label: str = "accuracy (%)") -> Path:
    """Fractions in [0, 1] shown as percentages, one cell per (row, column), each with its number: a grid of
    accuracies (recall's pairs by gap) on one fixed red-to-green scale, so figures of different runs compare."""
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2.5, 0.5 * len(rows) + 2))
    im = ax.imshow([[100 * v for v in row] for row in grid], vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return save_figure(fig, path)


def loss_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Training and validation loss against step, from metrics.jsonl rows; None when no row has a loss."""
    keys = sorted({k for r in rows for k in r if k.endswith("/loss") and r.get("step") is not None})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = sorted({r["step"]: r[key] for r in rows if key in r and r.get("step") is not None}.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                markersize=3, label=key)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"loss curves {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig: matplotlib.figure.Figure, path: Path) -> Path:
    """Lay the figure out (unless it has its own layout, e.g. constrained), write it and close it. The saved image
    is cut to what is drawn (`bbox_inches="tight"`), so no label or legend falls off its edge."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    # A unique temporary name, then a rename: readers never see half a PNG, and ranks drawing the same
    # figure do not trip over each other.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path

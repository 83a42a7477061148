"""The passkey task's figures: accuracy per (length, depth) cell, and accuracy by key-question distance."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.figure
import matplotlib.pyplot as plt

from infini_bench.paper import length_label
from infini_bench.plots import distance_axis, distance_bin, distance_ticks, save_figure


def grid_heatmap(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Token accuracy per cell: lengths across, depths down (the needle-in-a-haystack picture)."""
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    acc = {(r["length"], r["depth"]): r["acc"] for r in rows}
    grid = [[100 * acc[(length, d)] for length in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="token accuracy (%)")
    return save_figure(fig, path)



PASSKEY_DISTANCE = "segments between the key and the question\n(0: the same segment, local attention)"


def distance_figure(rows: Sequence[dict], title: str, chance: float | None = None) -> matplotlib.figure.Figure:
    """Accuracy against the number of segments between the key and the question: does the memory hold up? The
    bins sit on a fixed power-of-two axis (`distance_axis`): an empty bin is a gap marked n=0, not a bin skipped.
    Token accuracy and exact match often coincide (both 0 or 100), so they differ in every way but colour can't
    show: a thick translucent line with dots under a thin dashed one with hollow squares, both visible where they
    meet."""
    by_bin = {distance_bin(r): r for r in rows}
    axis = distance_axis(list(by_bin))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(axis) + 2), 4), layout="constrained")
    x = range(len(axis))
    nan = float("nan")
    ax.plot(x, [100 * by_bin[k]["acc"] if k in by_bin else nan for k in axis], marker="o", markersize=7, linewidth=3,
            alpha=0.6, label="token accuracy")
    ax.plot(x, [100 * by_bin[k]["exact"] if k in by_bin else nan for k in axis], marker="s", markersize=9,
            markerfacecolor="none", markeredgewidth=1.5, linewidth=1.5, linestyle="--", label="exact match")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle=":", label="chance (token accuracy)")
    for i, k in enumerate(axis):
        if k in by_bin:
            ax.annotate(f"n={by_bin[k]['n']}", (i, 100 * by_bin[k]["acc"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7)
        else:  # no prompt put its key this far back
            ax.annotate("n=0", (i, 0), ha="center", fontsize=7, color="gray")
    distance_ticks(ax, axis, PASSKEY_DISTANCE)
    ax.set_ylim(-5, 110)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def distance_plot(rows: Sequence[dict], path: Path, title: str, chance: float | None = None) -> Path:
    """`distance_figure`, saved as a PNG."""
    return save_figure(distance_figure(rows, title, chance), path)

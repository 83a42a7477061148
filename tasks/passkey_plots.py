"""The passkey task's figures: accuracy per (length, depth) cell, and accuracy by key-question distance."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.figure
import matplotlib.pyplot as plt

from infini_bench.paper import length_label
from infini_bench.plots import save_figure


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



def distance_figure(rows: Sequence[dict], title: str, chance: float | None = None) -> matplotlib.figure.Figure:
    """Accuracy against the number of segments between the key and the question: does the memory hold up? Token
    accuracy and exact match often coincide (both 0 or 100), so they differ in every way but colour can't show:
    a thick translucent line with dots under a thin dashed one with hollow squares, both visible where they meet."""
    labels = [str(r["segments_back_min"]) if r["segments_back_min"] == r["segments_back_max"]
              else f"{r['segments_back_min']}-{r['segments_back_max']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4), layout="constrained")
    x = range(len(rows))
    ax.plot(x, [100 * r["acc"] for r in rows], marker="o", markersize=7, linewidth=3, alpha=0.6,
            label="token accuracy")
    ax.plot(x, [100 * r["exact"] for r in rows], marker="s", markersize=9, markerfacecolor="none",
            markeredgewidth=1.5, linewidth=1.5, linestyle="--", label="exact match")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle=":", label="chance (token accuracy)")
    for i, r in enumerate(rows):
        ax.annotate(f"n={r['n']}", (i, 100 * r["acc"]), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=7)
    ax.set_xticks(list(x), labels, rotation=45 if len(rows) > 8 else 0)
    ax.set_ylim(-5, 110)
    ax.set_xlabel("segments between the key and the question\n(0: the same segment, local attention)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def distance_plot(rows: Sequence[dict], path: Path, title: str, chance: float | None = None) -> Path:
    """`distance_figure`, saved as a PNG."""
    return save_figure(distance_figure(rows, title, chance), path)

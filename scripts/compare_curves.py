"""Metrics of several runs against step, one panel per metric, one line per run: learning curves side by side
without W&B, read from each run folder's metrics.jsonl.

    python scripts/compare_curves.py curves.png outputs/mini/recall/full outputs/mini/recall/linear
    python scripts/compare_curves.py curves.png n128=probe1/full n32=probe3/full \
        --key train/loss --key 'recall/val_acc@pairs=8,gap=1' --smooth 25

A run is a folder, or `label=folder` (the label defaults to the folder's name; a label has no "="). --key picks
a metric (repeatable; default train/loss); --smooth K draws the train/ metrics as the mean of each K consecutive
logged values (a recall step's loss jumps with its samples' pair count); evaluations are drawn as logged. A folder
without metrics.jsonl, or a key no run logged, stops it with one line and exit 1, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infini_bench.plots import draw_lines, plt, save_figure  # noqa: E402


def block_means(values: list[float], k: int) -> list[float]:
    """The mean of each run of k consecutive values (the last run may be shorter); k = 1: the values."""
    return [sum(values[i: i + k]) / len(values[i: i + k]) for i in range(0, len(values), k)]


def curve(rows: list[dict], key: str, smooth: int) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, each step's last value, in step order, averaged in blocks of `smooth`
    (each block drawn at its last step)."""
    points = sorted({r["step"]: r[key] for r in rows if key in r and r.get("step") is not None}.items())
    steps, values = [p[0] for p in points], [float(p[1]) for p in points]
    if smooth > 1:
        steps = [steps[min(i + smooth, len(steps)) - 1] for i in range(0, len(steps), smooth)]
        values = block_means(values, smooth)
    return steps, values


def read_runs(specs: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if Path(spec).is_dir() or not sep:  # Hydra's run folders have "=" in their names
            label, path = Path(spec).name, Path(spec)
        else:
            path = Path(folder)
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise SystemExit(f"error: run {spec!r}: no metrics.jsonl in {path}")
        runs[label] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return runs


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("runs", nargs="+", help="run folders, or label=folder")
    p.add_argument("--key", action="append", default=None, help="a metric of metrics.jsonl (repeatable)")
    p.add_argument("--smooth", type=int, default=1, help="train/ metrics: the mean of each K logged values (default 1)")
    p.add_argument("--title", default="", help="the figure's title")
    args = p.parse_args(argv)
    if args.smooth < 1:
        raise SystemExit(f"error: --smooth: {args.smooth} must be at least 1")
    keys = args.key or ["train/loss"]
    runs = read_runs(args.runs)
    for key in keys:
        if not any(key in r for rows in runs.values() for r in rows):
            logged = sorted({k for rows in runs.values() for r in rows for k in r if k != "step"})
            raise SystemExit(f"error: --key: no run logged {key!r}; logged: {', '.join(logged[:12])}"
                             + (", ..." if len(logged) > 12 else ""))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        smooth = args.smooth if key.startswith("train/") else 1
        curves = {label: curve(rows, key, smooth) for label, rows in runs.items()}
        draw_lines(ax, {label: c[1] for label, c in curves.items()}, {label: c[0] for label, c in curves.items()})
        ax.set_xlabel("step")
        ax.set_title(key + (f" (mean of {smooth})" if smooth > 1 else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    out = save_figure(fig, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

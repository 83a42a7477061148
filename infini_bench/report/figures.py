"""The report's figures, written in report_img/ beside it: for each seed table its loss by segment, the same minus
none's, training loss and gates (the paper's Figure 3); across runs, the loss by segment per data set and model,
ROUGE by input length (Figure 4) and each task's training loss; and links to each run's own figures. The passkey
and recall sections link their own: accuracy by distance, every memory on one axis (`distance_figures`)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from infini_bench.paper import FIGURE4_ENDS, length_label
from infini_bench.report.runs import _by_task, _split, overrides, shared_overrides, sources
from infini_bench.report.seeds import arms_in_order, booksum_recipe, by_setting, final_gates, gate_trajectory, seed_groups
from infini_bench.tracking import read_metrics


# ---- each seed table's figures ---------------------------------------------------------------------------------------


SEGMENTS_SHOWN = 48  # three training lengths of 16 segments: enough to see what happens past the trained length


def _memory_of(by_arm: dict[str, list[dict]]) -> dict[str, str]:
    return {label: runs[0]["config"]["memory"]["name"] for label, runs in by_arm.items()}


def _mean_curve(runs: list[dict], length: int | None = None) -> list[float]:
    """The per-segment-index loss, mean over seeds, as long as the shortest run's (at most `length`)."""
    curves = [r["results"].get(f"{_split(r['results'])}/loss_by_segment") or [] for r in runs]
    n = min(min((len(cv) for cv in curves), default=0), length or SEGMENTS_SHOWN)
    return [sum(cv[k] for cv in curves) / len(curves) for k in range(n)]


def seed_curves(by_arm: dict[str, list[dict]], path: Path) -> Path:
    """Loss by segment position, mean over seeds, one line per memory or arm; the y axis stops at 1.5x the
    highest first-segment loss, so a memory that fails past its training length does not flatten the others."""
    from infini_bench.plots import line_plot

    memory = _memory_of(by_arm)
    series, memories = {}, {}
    for label in arms_in_order(by_arm):
        if curve := _mean_curve(by_arm[label]):
            name = f"{label} ({len(by_arm[label])} seeds)"
            series[name], memories[name] = curve, memory[label]
    top = 1.5 * max(ys[0] for ys in series.values())
    return line_plot(series, path, "segment index in document", "mean token loss (nats)",
                     "Loss by segment position (16 segments trained)", ymax=top, memories=memories)


def seed_differences(by_arm: dict[str, list[dict]], path: Path) -> Path | None:
    """Each memory's and arm's loss by segment minus none's (means over seeds): below zero, better than local
    attention at that position. None when the table has no none row."""
    from infini_bench.plots import line_plot

    if "none" not in by_arm:
        return None
    base, memory = _mean_curve(by_arm["none"]), _memory_of(by_arm)
    series, memories = {}, {}
    for label in arms_in_order(by_arm):
        curve = _mean_curve(by_arm[label], len(base))
        if label != "none" and curve and max(curve) < 1.5 * base[0]:  # a memory that fails off the trained length
            series[label], memories[label] = [y - b for y, b in zip(curve, base)], memory[label]
    return line_plot(series, path, "segment index in document", "loss minus none's (nats)",
                     "Loss by segment position, relative to local attention", memories=memories) if series else None


def seed_training(by_arm: dict[str, list[dict]], path: Path) -> Path:
    """Training loss against step, one line per run."""
    from infini_bench.plots import line_plot

    memory = _memory_of(by_arm)
    series, xs, memories = {}, {}, {}
    for label in arms_in_order(by_arm):
        for r in by_arm[label]:
            metrics = Path(r["path"]) / "metrics.jsonl"
            rows = {row["step"]: row["train/loss"] for row in read_metrics(metrics) if "train/loss" in row} \
                if metrics.exists() else {}
            if rows:
                name = f"{label} s{r['config'].get('seed', 0)}"
                series[name], xs[name], memories[name] = list(rows.values()), list(rows), memory[label]
    return line_plot(series, path, "step", "training loss (nats)", "Training loss", x=xs, memories=memories)


def file_stem(label: str) -> str:
    """An arm's label as a file name: `linear memory.read_norm=rms` -> `linear_memory.read_norm-rms`."""
    return label.replace(" ", "_").replace("=", "-").replace("/", "-")


def seed_gates(by_arm: dict[str, list[dict]], folder: Path, stem: str) -> list[tuple[str, Path]]:
    """The paper's Figure 3 for each gated memory or arm of a seed table: the final sigmoid(beta) per layer and
    head, the mean over the seeds that logged gates."""
    import torch

    from infini_bench.plots import gate_heatmap

    figures = []
    for label in arms_in_order(by_arm):
        per_run = [g for g in map(final_gates, by_arm[label]) if g]
        if not per_run:
            continue
        cells = sorted(set().union(*per_run))
        layers, heads = sorted({i for i, _ in cells}), max(j for _, j in cells) + 1
        mean = torch.tensor([[sum(g.get((i, j), float("nan")) for g in per_run) / len(per_run)
                              for j in range(heads)] for i in layers])
        title = f"{label}: sigmoid(beta), mean of {len(per_run)} seed{'s' * (len(per_run) > 1)}"
        path = folder / f"{stem}_gates_{file_stem(label)}.png"
        figures.append((label, gate_heatmap(mean, path, title, layers=layers)))
    return figures


def seed_gate_history(by_arm: dict[str, list[dict]], path: Path) -> Path | None:
    """The gates over training (`gate_trajectory`) of each arm whose runs logged them at two steps or more: one
    panel for the mean over heads, one for the widest head. None if no arm did."""
    from infini_bench.plots import panels_plot

    memory = _memory_of(by_arm)
    panels: dict[str, dict[str, list[float]]] = {"mean over heads": {}, "widest head": {}}
    xs, memories = {}, {}
    for label in arms_in_order(by_arm):
        if trajectory := gate_trajectory(by_arm[label]):
            name = f"{label} ({trajectory.seeds} seed{'s' * (trajectory.seeds > 1)})"
            panels["mean over heads"][name], panels["widest head"][name] = trajectory.mean, trajectory.widest
            xs[name], memories[name] = trajectory.steps, memory[label]
    return panels_plot(panels, path, "step", "sigmoid(beta): 0 reads local attention only", "Gates over training",
                       memories, x=xs) if xs else None


# ---- accuracy by distance, linked from the passkey and recall sections ---------------------------------------------


# Per task: the results key of its by-distance rows, what lies between, and the nearest bin a sample can fall in
# (a recall query comes at least one segment after its pair; a passkey question can share the key's segment).
DISTANCE = {"passkey": ("passkey/by_segments_back", "the key and the question", 0),
            "recall": ("recall/by_segments_back", "a pair and its query", 1)}


def _recipe_label(runs: list[dict]) -> str:
    """A figure's short name for the recipe of `runs`: model, segment length and steps (a range where a time
    budget gave the runs different counts)."""
    c = runs[0]["config"]
    steps = sorted({r["results"].get("train/steps") or 0 for r in runs})
    count = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    return f"{c['model']['name']}, N={c['model'].get('segment_len')}, {count} steps"


def recall_axis(runs: list[dict], name: str) -> list[int]:
    """The values V of recall/acc@<name>=V (name: pairs or gap) any of `runs` recorded, not the cells'
    recall/acc@pairs=P,gap=G."""
    found = (re.fullmatch(rf"recall/acc@{name}=(\d+)", k) for r in runs for k in r["results"])
    return sorted({int(m[1]) for m in found if m})


def distance_by_memory(by_arm: dict[str, list[dict]], task: str, path: Path, title: str) -> Path:
    """Accuracy (passkey: token accuracy) against segments between key and question, or pair and query: one line
    per memory or arm, all on one fixed power-of-two axis (`distance_axis`), a bin no sample fell in a gap. A
    memory with several seeds is drawn at the mean of its seeds' accuracies in each bin (each seed weighs the
    same), and its legend says over how many; chance is drawn where the runs recorded it."""
    import matplotlib.pyplot as plt

    from infini_bench.plots import LEGEND_INSIDE, distance_axis, distance_bin, distance_ticks, draw_lines, save_figure

    key, between, first = DISTANCE[task]
    means, memories = {}, _memory_of(by_arm)
    for label in arms_in_order(by_arm):
        per_bin: dict[int, list[float]] = {}
        for r in by_arm[label]:
            for row in r["results"][key]:
                per_bin.setdefault(distance_bin(row), []).append(row["acc"])
        seeds = len(by_arm[label])
        name = label if seeds == 1 else f"{label} (mean of {seeds} seeds)"
        means[name] = ({k: 100 * sum(v) / len(v) for k, v in per_bin.items()}, memories[label])
    axis = distance_axis(sorted({k for bins, _ in means.values() for k in bins}), first)
    beside = len(means) > LEGEND_INSIDE  # the legend beside the axes, which keep their width
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(axis) + 2) + 3.5 * beside, 4), layout="constrained")
    draw_lines(ax, {name: [bins.get(k) for k in axis] for name, (bins, _) in means.items()},
               list(range(len(axis))), {name: memory for name, (_, memory) in means.items()})
    chances = {r["results"].get(f"{task}/chance") for runs in by_arm.values() for r in runs} - {None}
    if len(chances) == 1:  # one recipe, one chance; runs that disagree draw none rather than a wrong one
        ax.axhline(100 * chances.pop(), color="gray", linestyle=":", label="chance")
    distance_ticks(ax, axis, f"segments between {between}" + ("\n(0: the same segment)" if first == 0 else ""))
    ax.set_ylim(-5, 105)
    ax.set_ylabel(f"{'token ' if task == 'passkey' else ''}accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if beside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def distance_figures(results: list[dict], task: str, out: Path | None) -> list[str]:
    """The task's runs that recorded accuracy by distance, one figure per recipe (runs differing only in seed,
    memory and arm, `_setting`), written in report_img/; the markdown that shows them, or nothing."""
    key = DISTANCE[task][0]
    groups = list(by_setting([r for r in _by_task(results, task) if r["results"].get(key)]).values())
    if out is None or not groups:
        return []
    lines = ["", f"Accuracy against segments between {DISTANCE[task][1]}, every memory on one axis: bins 0, 1, 2-3, "
             "4-7, ... of segments, a gap where a memory had no sample; a memory run with several seeds is drawn at "
             "the mean of their accuracies in each bin, and its legend says how many.", ""]
    for i, by_arm in enumerate(groups):
        recipe = _recipe_label([r for runs in by_arm.values() for r in runs])
        path = out.parent / "report_img" / f"{task}_by_distance_{i + 1}.png"
        distance_by_memory(by_arm, task, path, f"{task}: accuracy by distance ({recipe})")
        lines += [f"![{task} by distance: {recipe}]({os.path.relpath(path, out.parent)})", ""]
    return lines[:-1]


def recall_by_pairs(results: list[dict], out: Path | None) -> list[str]:
    """task=recall's capacity: accuracy against the pairs stored (mean over the gaps, `recall/acc@pairs=P`), one line
    per memory or arm at the mean of its seeds, beside copying (1 / P: a value written, taken at random) and
    chance; one figure per recipe, like `distance_figures`. Returns the markdown that shows them, or nothing."""
    from infini_bench.plots import line_plot

    groups = list(by_setting(_by_task(results, "recall")).values())
    if out is None or not groups:
        return []
    lines = ["", "Accuracy against the pairs a sample stores (each the mean over the gaps), every memory on one "
             "axis: copying is a value of the sample taken at random (1 / pairs), which a model that never looks a "
             "key up can reach.", ""]
    for i, by_arm in enumerate(groups):
        runs = [r for rs in by_arm.values() for r in rs]
        pairs = recall_axis(runs, "pairs")
        if not pairs:
            continue
        series, colours, memories = {}, {}, _memory_of(by_arm)
        for label in arms_in_order(by_arm):
            seeds = by_arm[label]
            name = label if len(seeds) == 1 else f"{label} (mean of {len(seeds)} seeds)"
            values = [[r["results"].get(f"recall/acc@pairs={p}") for r in seeds] for p in pairs]
            series[name] = [100 * sum(v) / len(v) if None not in v else None for v in values]
            colours[name] = memories[label]
        references = {"copying: 1 / pairs": [100 / p for p in pairs]}
        chances = {r["results"].get("recall/chance") for r in runs} - {None}
        if len(chances) == 1:
            references["chance: 1 / vocab"] = [100 * chances.pop()] * len(pairs)
        recipe = _recipe_label(runs)
        path = out.parent / "report_img" / f"recall_by_pairs_{i + 1}.png"
        line_plot(series, path, "key-value pairs in the sample", "accuracy (%)",
                  f"recall: accuracy by pairs stored ({recipe})", x=pairs, logx=True, ymin=-5, ymax=105,
                  memories=colours, references=references)
        lines += [f"![recall by pairs: {recipe}]({os.path.relpath(path, out.parent)})", ""]
    return lines[:-1] if len(lines) > 3 else []


# ---- figures across runs, and the report's Figures section -----------------------------------------------------------


def _label(r: dict) -> str:
    c = r["config"]
    return f"{c['model']['name']} {c['memory']['name']} N={c['model'].get('segment_len')}"


def _oracles(books: list[dict], key: str = "booksum/oracle_memory/overall",
             name: str = "oracle: perfect memory") -> dict[str, tuple[list[int], list[float]]]:
    """A reference line (`key@<length>`, the perfect-memory oracle by default) for each distinct sweep among
    synthetic-book runs, {label: (lengths, values)}: runs of one recipe score the same books, so they share one
    line; recipes that differ get one line each."""
    lines: dict[tuple, None] = {}
    for r in books:
        lengths = list(r["config"]["task"]["eval_input_lens"])
        ys = [r["results"].get(f"{key}@{length_label(n)}") for n in lengths]
        if all(y is not None for y in ys):
            lines[(tuple(lengths), tuple(ys), r["config"]["model"].get("segment_len"))] = None
    return {name + (f" ({i + 1}, N={n})" if len(lines) > 1 else ""): (list(x), list(y))
            for i, (x, y, n) in enumerate(lines)}


# The paper's Figure 4 beside ours: its two ends only (the points between are not given), on real books and 8B.
PAPER_FIGURE4 = "paper: 8B on BookSum, about 17 at 16K to 20 at 500K (ends only)"


def booksum_labels(runs: list[dict]) -> dict[str, str]:
    """{a booksum run's path: its line's label}: `_label`, and where several recipes (`booksum_recipe`) have runs of
    one model and segment length, the overrides that set the run's recipe apart, so that each line is the mean over
    one recipe's seeds alone."""
    sweeps: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        model = r["config"]["model"]
        sweeps.setdefault((model["name"], model.get("segment_len")), {}).setdefault(
            booksum_recipe(r["config"]), []).append(r)
    labels = {}
    for recipes in sweeps.values():
        shared = {key: [a for a in shared_overrides(group) if not a.startswith("model.init_from=")]
                  for key, group in recipes.items()}
        common = set.intersection(*(set(v) for v in shared.values()))
        own = {key: " ".join(a for a in v if a not in common) for key, v in shared.items()}
        for i, (key, group) in enumerate(recipes.items()):
            alike = sum(o == own[key] for o in own.values()) > 1  # nothing on the command line tells them apart
            suffix = f"recipe {i + 1}" if alike else own[key]
            labels.update({r["path"]: f"{_label(r)} ({suffix})" if suffix else _label(r) for r in group})
    return labels


def _seed_means(runs: list[dict], xs: dict[str, list[int]], key: str,
                labels: dict[str, str] | None = None) -> dict[str, list[float | None]]:
    """{a run's label (`labels` by path, else `_label`): the mean over its runs (seeds) of `key@<length>` at each
    of its lengths}."""
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        by_label.setdefault(labels[r["path"]] if labels else _label(r), []).append(r)
    series = {}
    for label, group in by_label.items():
        values = [[r["results"].get(f"{key}@{length_label(n)}") for r in group] for n in xs[label]]
        series[label] = [sum(v) / len(v) if (v := [x for x in vs if x is not None]) else None for vs in values]
    return series


def _memories(runs: list[dict], labels: dict[str, str] | None = None) -> dict[str, str]:
    """{a run's label (`labels` by path, else `_label`): its memory}, which picks its colour in a figure."""
    return {labels[r["path"]] if labels else _label(r): r["config"]["memory"]["name"] for r in runs}


def segment_group(r: dict) -> str:
    """The panel of an LM run's loss-by-segment curve: its evaluation data and split, model, size and segment
    length. Curves compare only within one: other data or another model moves the whole curve, and at another
    segment length segment k covers other tokens. The size has two significant figures, so that a memory's own
    few parameters (RMT's memory tokens, the gates) leave its run beside the others."""
    c, res = r["config"], r["results"]
    dataset = c["task"].get("dataset")
    params = res.get("model/params")
    size = f" ({float(f'{params:.2g}') / 1e6:g}M params)" if params else ""
    return (f"{sources(res).get(dataset, dataset)} ({_split(res)}): {c['model']['name']}{size}, "
            f"N={c['model'].get('segment_len')}")


def segment_panels(results: list[dict]) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """The LM runs' loss by segment as {panel (`segment_group`): {line: curve}}, and each line's memory. A line is
    named by its memory and the overrides that set its run apart from the others in its panel."""
    groups: dict[str, list[dict]] = {}
    for r in _by_task(results, "lm"):
        if f"{_split(r['results'])}/loss_by_segment" in r["results"]:
            groups.setdefault(segment_group(r), []).append(r)
    panels, memories = {}, {}
    for name in sorted(groups):
        shared = set.intersection(*(set(overrides(r)) for r in groups[name]))
        series = {}
        for r in groups[name]:
            memory = r["config"]["memory"]["name"]
            label = " ".join([memory, *(a for a in overrides(r) if a not in shared and not a.startswith("memory="))])
            if label in series:  # same overrides, another folder
                label += f" ({Path(r['path']).name})"
            series[label], memories[label] = r["results"][f"{_split(r['results'])}/loss_by_segment"], memory
        panels[name] = series
    return panels, memories


def figures(results: list[dict], out: Path) -> list[str]:
    """Plots across runs (written next to the report, in report_img/) and links to each run's own."""
    from infini_bench.plots import line_plot, panels_plot

    img = out.parent / "report_img"
    lines = ["## Figures", ""]

    def add(title: str, path: Path) -> None:
        lines.extend([f"![{title}]({os.path.relpath(path, out.parent)})", ""])

    panels, memories = segment_panels(results)
    if panels:
        add("loss by segment", panels_plot(panels, img / "loss_by_segment.png", "segment index in document",
                                           "mean token loss (nats)", "Loss by segment position: one panel per data "
                                           "set, model and segment length", memories))
    for i, by_arm in enumerate(seed_groups(results).values()):
        add(f"seed table {i + 1}: loss by segment", seed_curves(by_arm, img / f"table2_seeds_{i + 1}_segments.png"))
        if path := seed_differences(by_arm, img / f"table2_seeds_{i + 1}_vs_none.png"):
            add(f"seed table {i + 1}: loss by segment minus none's", path)
        add(f"seed table {i + 1}: training loss", seed_training(by_arm, img / f"table2_seeds_{i + 1}_train.png"))
        if path := seed_gate_history(by_arm, img / f"table2_seeds_{i + 1}_gates_over_training.png"):
            add(f"seed table {i + 1}: gates over training", path)
        for label, path in seed_gates(by_arm, img, f"table2_seeds_{i + 1}"):
            add(f"seed table {i + 1}: gates of {label}", path)
    books = [r for r in _by_task(results, "booksum") if r["config"]["task"].get("eval_input_lens")]
    if books:
        labels = booksum_labels(books)
        xs = {labels[r["path"]]: list(r["config"]["task"]["eval_input_lens"]) for r in books}
        series = _seed_means(books, xs, "booksum/overall", labels)
        oracles = _oracles(books)
        oracles[PAPER_FIGURE4] = ([n for n, _ in FIGURE4_ENDS], [y for _, y in FIGURE4_ENDS])
        xs.update({label: x for label, (x, _) in oracles.items()})
        add("ROUGE by input length", line_plot(series, img / "rouge_by_length.png", "input length (tokens)",
                                               "overall ROUGE (mean over seeds)",
                                               "Summary quality against input length (Figure 4)",
                                               x=xs, logx=True, ymin=0, memories=_memories(books, labels),
                                               references={label: ys for label, (_, ys) in oracles.items()}))
        counted = [r for r in books if any(k.startswith("booksum/events_recalled@") for k in r["results"])]
        if counted:
            xs = {labels[r["path"]]: list(r["config"]["task"]["eval_input_lens"]) for r in counted}
            refs = _oracles(counted, "booksum/events_in_input", "events in the input")
            series = _seed_means(counted, xs, "booksum/events_recalled", labels)
            xs.update({label: x for label, (x, _) in refs.items()})
            add("events stated by input length", line_plot(
                series, img / "events_by_length.png", "input length (tokens)",
                "share of a book's events stated word for word (mean over seeds)",
                "Events a summary states against input length", x=xs, logx=True, ymin=-0.02, ymax=1.02,
                memories=_memories(counted, labels), references={label: ys for label, (_, ys) in refs.items()}))
    for task in ("lm", "passkey", "booksum"):
        curves, runs = {}, _by_task(results, task)
        for r in runs:
            metrics = Path(r["path"]) / "metrics.jsonl"
            rows = [row for row in read_metrics(metrics) if "train/loss" in row] if metrics.exists() else []
            if rows:
                curves[_label(r)] = {row["step"]: row["train/loss"] for row in rows}  # a resumed step: the latest
        if curves:
            add(f"{task} loss curves", line_plot({k: list(v.values()) for k, v in curves.items()},
                                                 img / f"{task}_loss_curves.png", "step", "training loss (nats)",
                                                 f"{task}: training loss", x={k: list(v) for k, v in curves.items()},
                                                 memories=_memories(runs)))
    lines += ["Each run's own figures:", "", "| run | figures |", "|---|---|"]
    for r in results:
        own = [p for p in ("gates.png", "passkey_heatmap.png", "booksum_length_sweep.png", "loss_by_segment.png",
                           "loss_curves.png") if (Path(r["path"]) / p).exists()]
        if own:
            links = ", ".join(f"[{p[:-4]}]({os.path.relpath(Path(r['path']) / p, out.parent)})" for p in own)
            lines.append(f"| {r['config']['task']['name']}: {_label(r)} | {links} |")
    return lines

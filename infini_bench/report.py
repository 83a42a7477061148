"""Our numbers next to the paper's: `python -m infini_bench.report outputs multirun --out docs/REPORT.md`.

Reads every results.json under the given folders (a run found twice, e.g. rerun or in a sweep, counts once: the
latest wins) and writes Tables 1-4 and the Figure 4 length sweep with the paper's rows and columns, our rows
aligned under them, and the figures. Each of our rows says its data source, scale and command, so a run on the
embedded books is never read as a PG19 number. `results_table` is the table a run prints when it ends.

`--csv runs.csv` writes one row per run (its overrides and numeric metrics) for a spreadsheet or pandas;
`--task`, `--experiment` and `--only PATTERN` (a folder glob) keep some runs out of both outputs.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import sys
from pathlib import Path

import yaml

from infini_bench.memories import memory_names
from infini_bench.paper import (
    FIGURE4_LENGTHS, FIGURE4_TREND, TABLE1, TABLE2, TABLE2_COMPRESSION, TABLE2_MEMORY, TABLE2_MEMORY_FLOATS,
    TABLE2_XL_CACHE, TABLE3, TABLE3_LENGTHS, TABLE4, length_label,
)
from infini_bench.files import atomic_write_text
from infini_bench.tracking import read_metrics

DEPTHS = ("start", "middle", "end")
HUB_COLUMNS = {"pg19": "PG19", "arxiv_math": "Arxiv-math"}
# Keys that say how a run was launched or logged, not what it computed: runs differing only there are one run.
_NOT_IDENTITY = {"hydra", "logger", "device", "cache_dir"}
_NOT_IDENTITY_TRAINER = {"progress", "resume"}
# Keys added after some runs were recorded, each with the value that does what those runs did: a run recorded
# without the key is the same run as one with this value.
_ADDED_KEYS = {("task", "window_start"): "any", ("task", "limit"): None}
CONF = Path(__file__).resolve().parents[1] / "conf"
ABLATIONS = CONF.parent / "docs" / "ABLATIONS.md"  # what the seed table's ablation arms test


def _identity(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
    if isinstance(kept.get("trainer"), dict):
        kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in _NOT_IDENTITY_TRAINER}
    for (section, key), value in _ADDED_KEYS.items():
        if isinstance(kept.get(section), dict) and key not in kept[section]:
            kept[section] = {**kept[section], key: value}
    # Runs recorded when the tiny/paper choice was `task.setting` (with `model.scale`, and the values of both
    # scales under `presets` in task and trainer) name it `scale` now; the values themselves are unchanged.
    if isinstance(kept.get("task"), dict) and "setting" in kept["task"]:
        kept.setdefault("scale", kept["task"]["setting"])
    for section, keys in (("task", ("setting", "presets")), ("trainer", ("setting", "presets")), ("model", ("scale",))):
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return json.dumps(kept, sort_keys=True, default=str)


def read_run(folder: Path) -> dict:
    """A run folder's results.json, with the folder (`path`) and when the file was written (`mtime`)."""
    path = Path(folder) / "results.json"
    data = json.loads(path.read_text())
    data["path"], data["mtime"] = str(path.parent), path.stat().st_mtime
    return data


def all_runs(roots: list[Path]) -> list[dict]:
    """Every results.json below the roots, with its folder, in folder order."""
    return [read_run(path.parent) for root in roots for path in sorted(Path(root).rglob("results.json"))]


def merge_reruns(runs: list[dict]) -> list[dict]:
    """Runs with the same config count once: the latest results.json wins, and `merged` says how many it stands
    for."""
    latest: dict[str, dict] = {}
    for data in runs:
        key = _identity(data.get("config", {}))
        if key in latest:
            data = {**data, "merged": latest[key].get("merged", 1) + 1}
            if data["mtime"] < latest[key]["mtime"]:
                data = {**latest[key], "merged": data["merged"]}
        latest[key] = data
    return sorted(latest.values(), key=lambda r: r["path"])


def find_results(roots: list[Path]) -> list[dict]:
    """Every run below the roots, a rerun counted once (`merge_reruns`)."""
    return merge_reruns(all_runs(roots))


# ---- choosing runs, and the CSV of them ------------------------------------------------------------------------------


def options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group: the names of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def overrides(r: dict) -> list[str]:
    """The command-line overrides that made a run, as its results.json recorded them; for a run that predates that
    record, its .hydra/overrides.yaml (second best: every later command on the folder rewrites it)."""
    recorded = (r["config"].get("hydra") or {}).get("overrides")
    if recorded is not None:
        return list(recorded)
    path = Path(r["path"]) / ".hydra" / "overrides.yaml"
    return [str(a) for a in yaml.safe_load(path.read_text()) or []] if path.exists() else []


def experiment_of(r: dict) -> str | None:
    """The experiment a run was made with (Hydra's choice, else its experiment= override), or None."""
    choices = (r["config"].get("hydra") or {}).get("choices") or {}
    if "experiment" in choices:
        return choices["experiment"]
    return next((a.split("=", 1)[1] for a in overrides(r) if a.startswith("experiment=")), None)


def select(runs: list[dict], task: str | None = None, experiment: str | None = None,
           only: list[str] | None = None) -> list[dict]:
    """The runs of `task`, made with `experiment`, whose folder matches one of the `only` patterns: each a glob
    matched anywhere in the path, so a plain word matches as a substring (`mini`, `table2*/tiny-linear`).
    None or empty: no filter."""
    return [r for r in runs
            if (task is None or r["config"]["task"]["name"] == task)
            and (experiment is None or experiment_of(r) == experiment)
            and (not only or any(fnmatch.fnmatch(r["path"], f"*{pattern}*") for pattern in only))]


def csv_table(runs: list[dict]) -> str:
    """One CSV row per run: its folder, task, model and memory, then one column per override key (empty where a
    run did not set it) and one per numeric metric (`val/ppl`, `passkey/acc`, ...)."""
    rows, metrics = [], set()
    for r in runs:
        c = r["config"]
        row = {"path": r["path"], "task": c["task"]["name"], "model": c["model"]["name"],
               "memory": c["memory"]["name"]}
        for arg in overrides(r):
            key, _, value = arg.lstrip("+~").partition("=")
            row[key] = value
        numbers = {k: v for k, v in r["results"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics |= set(numbers)
        rows.append({**row, **numbers})
    fixed = ["path", "task", "model", "memory"]
    keys = sorted({k for row in rows for k in row} - set(fixed) - metrics)
    text = io.StringIO()
    writer = csv.DictWriter(text, fixed + keys + sorted(metrics), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x):
    return None if x is None else 100 * x


def sources(results: dict) -> dict[str, str]:
    """`data/source` as {data set asked for: data set used}: "pg19=embedded_pg19, c4=None", or a bare name."""
    text = str(results.get("data/source") or "")
    if not text:
        return {}
    if "=" not in text:
        return {text: text}
    return dict(part.strip().split("=", 1) for part in text.split(","))


def fallbacks(results: dict) -> list[str]:
    """The hub data sets a run asked for but did not get ("pg19 -> embedded_pg19", "c4 -> left out")."""
    return [f"{asked} -> {'left out' if used in ('None', '') else used}" for asked, used in sources(results).items()
            if asked != used]


def command(r: dict) -> str:
    """The command that made a run (as run.py recorded it), else the one that would."""
    c = r["config"]
    if (c.get("hydra") or {}).get("command"):
        return c["hydra"]["command"]
    return f"python run.py task={c['task']['name']} model={c['model']['name']} memory={c['memory']['name']}"


def _link(r: dict, out: Path | None) -> str:
    """The W&B run online, else its offline folder (for `wandb sync`), else the run folder."""
    w = r.get("wandb") or {}
    if w.get("url"):
        return f"[W&B]({w['url']})"
    target = Path(w.get("dir") or r["path"])
    rel = os.path.relpath(target, out.parent) if out is not None else str(target)
    return f"[{'W&B offline' if w.get('dir') else 'run'}]({rel})"


def _scale(r: dict) -> str:
    c, res = r["config"], r["results"]
    seq = c["task"].get("seq_len") or c["task"].get("train_input_len")
    n = c["model"].get("segment_len")
    parts = [c["model"]["name"]]
    if res.get("model/params"):
        parts.append(f"{res['model/params'] / 1e6:.1f}M params")
    if seq and n:
        parts.append(f"{seq // n} x {n} tokens")
    parts.append(f"{res.get('train/steps') or 0} steps")
    if r.get("merged", 1) > 1:
        parts.append(f"latest of {r['merged']} runs")
    return ", ".join(parts)


def _ours(r: dict, out: Path | None) -> str:
    return f"`{command(r)}`<br>{_scale(r)}; {_link(r, out)}"


def _by_task(results: list[dict], task: str) -> list[dict]:
    return [r for r in results if r["config"]["task"]["name"] == task]


# ---- Table 1 ---------------------------------------------------------------------------------------------------------


def footprint(res: dict) -> tuple[int | None, int | None, int | None]:
    """(the paper's formula in floats, the floats our state carries, its bytes), from the footprint keys the run
    wrote, or the formula alone (model/memory_floats) from runs that predate them."""
    paper = res.get("footprint/paper_floats", res.get("model/memory_floats"))
    return paper, res.get("footprint/state_floats"), res.get("footprint/state_bytes")


def table1(results: list[dict], out: Path | None = None) -> list[str]:
    lines = ["## Memory footprint (Table 1)", "",
             "The paper's formula per kind of memory, its value in Table 2's setting, and what our runs carry from "
             "one segment to the next: the formula evaluated for the run's shape, the floats of the state actually "
             "carried, and their bytes.", "",
             "| memory | paper: formula | paper: floats (Table 2 setting) | ours: formula floats | ours: carried "
             "floats | ours: bytes | run |", "|---|---|---|---|---|---|---|"]
    for memory in memory_names():
        name, formula = TABLE1.get(memory, (None, None))
        paper = TABLE2_MEMORY_FLOATS.get(name) if name else None
        runs = [r for r in results if r["config"]["memory"]["name"] == memory]
        lines.append(f"| {memory} | {formula or '-'} | {_fmt(paper)} | | | | |")
        seen = set()
        for r in runs:
            cells = footprint(r["results"])
            key = (r["config"]["model"]["name"], r["config"]["model"].get("segment_len"), cells)
            if key in seen or all(x is None for x in cells):
                continue
            seen.add(key)
            lines.append(f"| | | | {' | '.join(_fmt(x) for x in cells)} | {r['config']['model']['name']}, "
                         f"N={r['config']['model'].get('segment_len')}; {_link(r, out)} |")
    linear = TABLE2_MEMORY_FLOATS["Infini-Transformer (Linear)"]
    ratio = TABLE2_MEMORY_FLOATS["Memorizing Transformers"] / linear
    lines += ["", f"The paper's compression column: Memorizing Transformers' memory over Infini-attention's, "
                  f"{TABLE2_COMPRESSION}x as printed ({ratio:.1f}x from the floats above)."]
    return lines


# ---- Table 2 ---------------------------------------------------------------------------------------------------------


def table2(results: list[dict], out: Path | None = None) -> list[str]:
    lines = ["## Long-context language modelling (Table 2), token perplexity", "",
             "Our rows sit under the paper's PG19 or Arxiv-math column only when the run evaluated on that hub data "
             "set; runs on other data (the embedded books, C4) show their perplexity under \"other data\".", "",
             "| memory | row | memory (floats) | XL cache | PG19 | Arxiv-math | other data | bits/byte | data source "
             "| scale, command, run |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = _by_task(results, "lm")
    for memory in memory_names():
        name = TABLE2_MEMORY.get(memory)
        if name:
            floats = TABLE2_MEMORY_FLOATS[name]
            lines.append(f"| {memory} | paper: {name} | {floats / 1e6:.1f}M | {TABLE2_XL_CACHE.get(name, 'none')} | "
                         f"{TABLE2[name]['pg19']} | {TABLE2[name]['arxiv_math']} | | | | |")
        for r in (r for r in runs if r["config"]["memory"]["name"] == memory):
            c, res = r["config"], r["results"]
            split = "test" if "test/ppl" in res else "val"
            dataset = c["task"].get("dataset")
            used = sources(res).get(dataset, dataset)
            cells = {"pg19": "", "arxiv_math": "", "other": ""}
            ppl = _fmt(res.get(f"{split}/ppl"))
            cells[used if used in HUB_COLUMNS else "other"] = ppl if used in HUB_COLUMNS else f"{ppl} ({used})"
            source = res.get("data/source") or dataset
            fell = fallbacks(res)
            if fell:
                source = f"{source} (**fell back**: {'; '.join(fell)})"
            floats = footprint(res)[0]
            lines.append(f"| {memory} | ours ({split}) | {_fmt(floats)} | | {cells['pg19']} | {cells['arxiv_math']} | "
                         f"{cells['other']} | {_fmt(res.get(f'{split}/bpb'))} | {source} | {_ours(r, out)} |")
    return lines


# ---- Table 2 across seeds ------------------------------------------------------------------------------------------

# Loss-by-segment bands of the seed table: the first segment (no memory yet, every model computes local attention
# alone), late segments inside the 16-segment training length, and segments beyond it.
SEGMENT_BANDS = (("first segment", 0, 1), ("segments 8-15", 8, 16), ("segments 16+", 16, None))


# Overrides that turn one knob of a memory (its options, the gate's start and learning rate): runs of one recipe that
# differ only there are arms of an ablation, rows of the recipe's seed table rather than tables of their own.
ARM_OVERRIDES = ("memory.", "model.gate_init=", "trainer.gate_lr=")


def _setting(config: dict) -> str:
    """A run's identity without its seed, memory and arm: the runs of one recipe that a seed table compares."""
    kept = json.loads(_identity(config))
    for key in ("seed", "memory", "name"):  # the run's name is made of its model and memory
        kept.pop(key, None)
    kept.get("model", {}).pop("gate_init", None)
    trainer = kept.get("trainer", {})
    for key in ("seed", "gate_lr"):
        trainer.pop(key, None)
    if "batch_size" in trainer:  # 8 sequences x 2 accumulated micro-batches is the same step as 16 x 1
        trainer["sequences_per_step"] = trainer.pop("batch_size") * trainer.pop("grad_accum", 1)
    return json.dumps(kept, sort_keys=True)


def arm(run: dict) -> str:
    """The row of a seed table a run belongs to: its memory, then the knobs it turned (`ARM_OVERRIDES`), e.g.
    `linear memory.read_norm=rms`; a run that turned none is its memory's name alone."""
    return " ".join([run["config"]["memory"]["name"], *sorted(a for a in overrides(run) if a.startswith(ARM_OVERRIDES))])


def arms_in_order(by_arm: dict[str, list[dict]]) -> list[str]:
    """Arms in the report's memory order, each memory's own row first and its ablations after it."""
    memory = {label: runs[0]["config"]["memory"]["name"] for label, runs in by_arm.items()}
    order = {m: i for i, m in enumerate(memory_names())}
    return sorted(by_arm, key=lambda label: (order.get(memory[label], len(order)), label != memory[label], label))


def _micro_batches(run: dict) -> str:
    t = run["config"].get("trainer", {})
    return f"{t.get('batch_size')} x {t.get('grad_accum', 1)}"


def seed_groups(results: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """LM runs that differ only in seed, memory and arm: {setting: {arm: runs}}, for settings where some arm has
    two seeds or more (single runs stay in the per-run table above)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in _by_task(results, "lm"):
        groups.setdefault(_setting(r["config"]), {}).setdefault(arm(r), []).append(r)
    return {k: v for k, v in groups.items() if any(len(runs) > 1 for runs in v.values())}


def _split(res: dict) -> str:
    return "test" if "test/ppl" in res else "val"


def band_loss(curve: list[float], lo: int, hi: int | None) -> float | None:
    """Mean of the per-segment-index losses from index lo up to hi (each index weighs the same)."""
    part = curve[lo:hi]
    return sum(part) / len(part) if part else None


def tokens_per_s(r: dict) -> float | None:
    """The median logged training tokens/s of a run (its metrics.jsonl), else tokens over seconds trained."""
    metrics = Path(r["path"]) / "metrics.jsonl"
    rates = sorted(row["train/tokens_per_s"] for row in read_metrics(metrics)
                   if "train/tokens_per_s" in row) if metrics.exists() else []
    if rates:
        return rates[len(rates) // 2]
    c, res = r["config"], r["results"]
    if res.get("train/seconds") and res.get("train/steps"):
        t = c["trainer"]
        return res["train/steps"] * t["batch_size"] * t["grad_accum"] * c["task"]["seq_len"] / res["train/seconds"]
    return None


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, max - min) of the seeds' values; the spread is 0 for one seed."""
    return sum(values) / len(values), max(values) - min(values)


def verdict(a: list[float], b: list[float]) -> str:
    """Lower, higher, or within noise: a difference counts only beyond twice the larger seed spread (and only
    with two seeds or more on each side)."""
    if not a or not b:
        return "-"
    if len(a) < 2 or len(b) < 2:
        return "one seed"
    (ma, sa), (mb, sb) = spread(a), spread(b)
    if abs(ma - mb) <= 2 * max(sa, sb):
        return "within noise"
    return f"{'lower' if ma < mb else 'higher'} by {abs(ma - mb):.3f}"


def _mean_spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, width = spread(values)
    return f"{mean:.{digits}f} ± {width / 2:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def position_gain(curve: list[float]) -> float | None:
    """Segments 16+ minus the first segment (nats): how much a run's loss falls as it reads further into a
    document. Compared with none's, it isolates what a memory gains from earlier segments from a level shift that
    lies on every segment alike."""
    late, first = band_loss(curve, 16, None), band_loss(curve, 0, 1)
    return None if late is None or first is None else late - first


def gate_summary(runs: list[dict]) -> str:
    """The final sigmoid(beta) of every head: the mean over heads and seeds, and the lowest and highest head."""
    gates = [g for r in runs for g in final_gates(r).values()]
    return f"{sum(gates) / len(gates):.2f} [{min(gates):.2f}, {max(gates):.2f}]" if gates else "-"


def table2_seeds(results: list[dict], out: Path | None = None) -> list[str]:
    lines = ["## Table 2 across seeds", "",
             "Runs of one recipe that differ only in seed and memory, one row per memory, and a row per ablation arm "
             "(a memory with its knobs turned: its options, `model.gate_init`, `trainer.gate_lr`) after its memory's "
             "row. Values are the mean over seeds ± half the range (max - min) / 2. A difference is called one only "
             "when it exceeds twice the larger of the two ranges. Loss bands are means over per-segment-index losses "
             "(nats); `16+ minus first` is how far a run's loss falls from a document's first segment to its "
             "segments 16+, so comparing it with none's removes a shift that lies on every segment alike. Gates are "
             "the final sigmoid(beta) of every head: mean [lowest, highest]. Tokens/s is the median logged rate, "
             "which depends on what else ran on the GPU at the time. The paper's perplexity (PG19 / Arxiv-math, its "
             "own data and scale) stands beside ours for reference, not comparison.", ""]
    for setting, by_arm in seed_groups(results).items():
        first = next(iter(by_arm.values()))[0]
        c = first["config"]
        split = _split(first["results"])
        ablated = any(" " in label for label in by_arm)
        lines += [f"### {c['task'].get('dataset')} ({split} split): {_scale(first)}", ""]
        if ablated:
            guide = ABLATIONS if out is None else Path(os.path.relpath(ABLATIONS, out.parent))
            lines += [f"What each ablation arm tests, and what the arms found: [{ABLATIONS.name}]({guide}).", ""]
        lines += [f"| memory | seeds | {split} bits/byte | {split} perplexity | "
                  + " | ".join(name for name, _, _ in SEGMENT_BANDS)
                  + " | 16+ minus first | bits/byte vs none | segments 8-15 vs none | 16+ minus first vs none | "
                  + ("bits/byte vs the memory's own row | " if ablated else "")
                  + "gates | train tokens/s | carried floats: paper formula / ours / bytes | paper PG19 / Arxiv-math "
                    "| runs |",
                  "|---|---|---|---|" + "---|" * len(SEGMENT_BANDS) + "---|---|---|---|" + "---|" * ablated
                  + "---|---|---|---|---|"]
        runs_of = {label: sorted(runs, key=lambda r: r["config"].get("seed", 0)) for label, runs in by_arm.items()}
        curves = {label: [r["results"].get(f"{split}/loss_by_segment") or [] for r in runs]
                  for label, runs in runs_of.items()}

        def per_run(label: str, f) -> list[float]:
            return [x for x in map(f, curves.get(label, [])) if x is not None]

        bpb = {label: [r["results"][f"{split}/bpb"] for r in runs] for label, runs in runs_of.items()}
        mid = {label: per_run(label, lambda cv: band_loss(cv, 8, 16)) for label in runs_of}
        gain = {label: per_run(label, position_gain) for label in runs_of}
        for label in arms_in_order(by_arm):
            runs = runs_of[label]
            memory = runs[0]["config"]["memory"]["name"]
            bands = [_mean_spread(per_run(label, lambda cv, lo=lo, hi=hi: band_loss(cv, lo, hi)))
                     for _, lo, hi in SEGMENT_BANDS]
            rates = [x for x in map(tokens_per_s, runs) if x is not None]
            paper = TABLE2.get(TABLE2_MEMORY.get(memory, ""), {})
            cited = f"{paper['pg19']} / {paper['arxiv_math']}" if paper else "-"
            versus = [("-" if label == "none" or "none" not in values else verdict(values[label], values["none"]))
                      for values in (bpb, mid, gain)]
            if ablated:
                versus.append("-" if label == memory or memory not in bpb else verdict(bpb[label], bpb[memory]))
            links = ", ".join(f"[s{r['config'].get('seed', 0)}]({os.path.relpath(r['path'], out.parent)})"
                              if out is not None else f"s{r['config'].get('seed', 0)}" for r in runs)
            lines.append(f"| {label} | {', '.join(str(r['config'].get('seed', 0)) for r in runs)} | "
                         f"{_mean_spread(bpb[label])} | "
                         f"{_mean_spread([r['results'][f'{split}/ppl'] for r in runs], 2)} | {' | '.join(bands)} | "
                         f"{_mean_spread(gain[label])} | {' | '.join(versus)} | {gate_summary(runs)} | "
                         f"{_fmt(sum(rates) / len(rates) / 1e3, 0) + 'K' if rates else '-'} | "
                         f"{' / '.join(_fmt(x) for x in footprint(runs[0]['results']))} | {cited} | {links} |")
        splits = {label: sorted({_micro_batches(r) for r in runs}) for label, runs in runs_of.items()}
        if len({b for bs in splits.values() for b in bs}) > 1:
            lines += ["", "Sequences per step as micro-batch x accumulated micro-batches (the same optimizer step; "
                          "the windows drawn differ): "
                      + "; ".join(f"{label} {', '.join(splits[label])}" for label in arms_in_order(by_arm))]
        lines.append("")
    return lines


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


def final_gates(run: dict) -> dict[tuple[int, int], float]:
    """{(layer, head): sigmoid(beta)} at the last step a run logged its gates (metrics.jsonl), else {}."""
    metrics = Path(run["path"]) / "metrics.jsonl"
    rows = [row for row in read_metrics(metrics) if any(k.startswith("gates/L") for k in row)] \
        if metrics.exists() else []
    if not rows:
        return {}
    last = max(rows, key=lambda row: row["step"])
    return {(int(k.split("/")[1][1:]), int(k.split("/")[2][1:])): v for k, v in last.items()
            if k.startswith("gates/L")}


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


# ---- Table 3 ---------------------------------------------------------------------------------------------------------


def _cell(grid: dict, label: str, key: str = "acc") -> str:
    values = [grid.get((label, d), {}).get(key) for d in DEPTHS]
    return "" if all(v is None for v in values) else "/".join(_fmt(_pct(v), 0) for v in values)


def table3(results: list[dict], out: Path | None = None) -> list[str]:
    lines = ["## Passkey retrieval (Table 3), token accuracy % with the needle at the start / middle / end", "",
             "Our lengths that are the paper's sit in its columns; others are listed under \"other lengths\". "
             "Exact match is the share of keys generated in full; chance is the best guess that never saw the "
             "needle (one token per digit).", "",
             "| row | " + " | ".join(TABLE3_LENGTHS) + " | other lengths | exact match % | chance % | needle in an "
             "earlier segment / the question's % | scale, command, run |",
             "|---|" + "---|" * (len(TABLE3_LENGTHS) + 5)]
    for (mode, memory), cells in TABLE3.items():
        lines.append(f"| paper: {mode} {memory} | " + " | ".join("/".join(map(str, c)) for c in cells)
                     + " | | | | | |")
    for r in _by_task(results, "passkey"):
        c, res = r["config"], r["results"]
        rows = res.get("passkey/grid", [])
        grid = {(row["length_label"], row["depth"]): row for row in rows}
        labels = list(dict.fromkeys(row["length_label"] for row in rows))
        other = "; ".join(f"{lab}: {_cell(grid, lab)}" for lab in labels if lab not in TABLE3_LENGTHS)
        steps = res.get("train/steps") or 0
        mode = "zero-shot" if c["task"].get("zero_shot") or not steps else f"fine-tuned {steps} steps"
        split = f"{_fmt(_pct(res.get('passkey/acc/earlier_segment')), 0)} / {_fmt(_pct(res.get('passkey/acc/same_segment')), 0)}"
        lines.append(f"| ours: {mode} {c['memory']['name']} | " + " | ".join(_cell(grid, lab) for lab in TABLE3_LENGTHS)
                     + f" | {other} | {_fmt(_pct(res.get('passkey/exact')), 0)} | "
                     f"{_fmt(_pct(res.get('passkey/chance')), 0)} | {split} | {_ours(r, out)} |")
    return lines


# ---- Table 4 and Figure 4 --------------------------------------------------------------------------------------------


def table4(results: list[dict], out: Path | None = None) -> list[str]:
    lines = ["## Book summarisation (Table 4), ROUGE F x 100 at the longest input", "",
             "| row | R-1 | R-2 | R-L | overall | input | data source | scale, command, run |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (r1, r2, rl, overall) in TABLE4.items():
        lines.append(f"| paper: {name} | {r1} | {r2} | {rl} | {overall} | 500K | BookSum test | |")
    runs = _by_task(results, "booksum")
    for r in runs:
        c, res = r["config"], r["results"]
        source = {"synthetic": "synthetic books (a pipeline check, not BookSum)"}.get(res.get("data/source"),
                                                                                         res.get("data/source"))
        split = c["task"].get("eval_split", "")
        lines.append(f"| ours: {c['model']['name']} {c['memory']['name']} | "
                     + " | ".join(_fmt(res.get(f"booksum/{k}")) for k in ("rouge1", "rouge2", "rougeL", "overall"))
                     + f" | {length_label(res['booksum/input_len']) if res.get('booksum/input_len') else '-'} | "
                     f"{source} ({split}) | {_ours(r, out)} |")
    lines += ["", "### Summary quality against input length (Figure 4), overall ROUGE", "",
              "| row | " + " | ".join(FIGURE4_LENGTHS) + " | other lengths |", "|---|" + "---|" * (len(FIGURE4_LENGTHS) + 1),
              f"| paper: Infini-Transformers, validation | {FIGURE4_TREND} (exact points not given) |"
              + " |" * len(FIGURE4_LENGTHS)]
    for r in runs:
        res = r["results"]
        sweep = {k.split("@", 1)[1]: v for k, v in res.items() if k.startswith("booksum/overall@")}
        other = "; ".join(f"{k}: {_fmt(v)}" for k, v in sweep.items() if k not in FIGURE4_LENGTHS)
        lines.append(f"| ours: {r['config']['model']['name']} {r['config']['memory']['name']} | "
                     + " | ".join(_fmt(sweep.get(k)) if k in sweep else "" for k in FIGURE4_LENGTHS) + f" | {other} |")
    return lines


# ---- figures ---------------------------------------------------------------------------------------------------------


def _label(r: dict) -> str:
    c = r["config"]
    return f"{c['model']['name']} {c['memory']['name']} N={c['model'].get('segment_len')}"


def _memories(runs: list[dict]) -> dict[str, str]:
    """{a run's `_label`: its memory}, which picks its colour in a figure."""
    return {_label(r): r["config"]["memory"]["name"] for r in runs}


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
        for label, path in seed_gates(by_arm, img, f"table2_seeds_{i + 1}"):
            add(f"seed table {i + 1}: gates of {label}", path)
    books = [r for r in _by_task(results, "booksum") if r["config"]["task"].get("eval_input_lens")]
    if books:
        xs = {_label(r): list(r["config"]["task"]["eval_input_lens"]) for r in books}
        series = {_label(r): [r["results"].get(f"booksum/overall@{length_label(n)}") for n in xs[_label(r)]]
                  for r in books}
        add("ROUGE by input length", line_plot(series, img / "rouge_by_length.png", "input length (tokens)",
                                               "overall ROUGE", "Summary quality against input length (Figure 4)",
                                               x=xs, logx=True, ymin=0, memories=_memories(books)))
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


def build_report(results: list[dict], out: Path | None = None) -> str:
    parts = ["# infini-bench report", "",
             "Rows marked `paper:` are the paper's (arXiv 2404.07143 v2); the others are runs found under the given "
             "folders, each with its data source, scale and command. Runs on the embedded offline data or at small "
             "scale check the pipeline and are not comparable with the paper's numbers.", ""]
    for table in (table1, table2, table2_seeds, table3, table4):
        parts += table(results, out) + [""]
    if out is not None:
        parts += figures(results, out) + [""]
    return "\n".join(parts)


# ---- the table a run ends with ---------------------------------------------------------------------------------------


def _paper_ppl(config: dict, results: dict) -> str:
    dataset = config["task"].get("dataset")
    used = sources(results).get(dataset, dataset)
    name = TABLE2_MEMORY.get(config["memory"]["name"])
    if name and used in HUB_COLUMNS:
        return f"{TABLE2[name][used]} (paper, {HUB_COLUMNS[used]})"
    return "-" if used in HUB_COLUMNS else f"- (paper: PG19 / Arxiv-math; this is {used})"


HEADLINE = ("test/ppl", "val/ppl", "passkey/acc %", "booksum/overall")


def headline(config: dict, res: dict) -> str:
    """A run's main number in a few characters ('val/ppl 19.94'), for a sweep's table of its jobs."""
    rows = {name: ours for name, ours, _ in _main_rows(config, res)}
    name = next((k for k in HEADLINE if k in rows), next(iter(rows), None))
    return f"{name} {rows[name]}" if name is not None else "no metric"


def _main_rows(config: dict, res: dict) -> list[tuple[str, str, str]]:
    """(metric, ours, the paper's value or chance) for a run's headline numbers."""
    task, memory = config["task"]["name"], config["memory"]["name"]
    if task == "lm":
        split = "test" if "test/ppl" in res else "val"
        return [(f"{split}/ppl", _fmt(res.get(f"{split}/ppl")), _paper_ppl(config, res)),
                (f"{split}/bpb", _fmt(res.get(f"{split}/bpb"), 3), ""),
                ("train/loss", _fmt(res.get("train/loss"), 3), "")]
    if task == "passkey":
        steps = res.get("train/steps") or 0
        mode = "zero-shot" if config["task"].get("zero_shot") or not steps else "fine-tuned"
        paper = dict(zip(TABLE3_LENGTHS, TABLE3.get((mode, memory), ())))
        grid = res.get("passkey/grid", [])
        rows = []
        for label in dict.fromkeys(row["length_label"] for row in grid):
            depths = [row["depth"] for row in grid if row["length_label"] == label]
            named = set(depths) <= set(DEPTHS)  # the paper's start / middle / end, else a depth sweep's fractions
            accs = "/".join(_fmt(_pct(res.get(f"passkey/acc@{label}/{d}")), 0) for d in depths)
            cited = ""
            if label in paper:
                by_depth = dict(zip(DEPTHS, paper[label]))
                cited = ("/".join(str(by_depth[d]) for d in depths) if named
                         else f"{'/'.join(map(str, paper[label]))} at {'/'.join(DEPTHS)}") + f" (paper, {mode})"
            rows.append((f"acc@{label} % at {'' if named else 'depth '}{'/'.join(depths)}", accs, cited))
        chance = _pct(res.get("passkey/chance"))
        rows += [("passkey/acc %", _fmt(_pct(res.get("passkey/acc")), 1), f"{_fmt(chance, 1)} (chance)"
                  if chance is not None else ""),
                 ("passkey/exact %", _fmt(_pct(res.get("passkey/exact")), 1), "")]
        return rows
    if task == "booksum":
        paper = {"linear": "Infini-Transformers (Linear)", "delta": "Infini-Transformers (Linear + Delta)"}.get(memory)
        cited = dict(zip(("rouge1", "rouge2", "rougeL", "overall"), TABLE4[paper])) if paper else {}
        rows = [(f"booksum/{k}", _fmt(res.get(f"booksum/{k}")), f"{cited[k]} (paper, 500K)" if k in cited else "")
                for k in ("rouge1", "rouge2", "rougeL", "overall")]
        rows += [(k, _fmt(v), "") for k, v in res.items() if k.startswith("booksum/overall@")]
        return rows
    return [(k, _fmt(v), "") for k, v in res.items() if isinstance(v, (int, float))]


def results_table(record: dict, out_dir: Path) -> str:
    """A compact table of a run's main results with the paper's value or chance beside them, and where its
    outputs are: what a run prints when it ends."""
    config, res = record["config"], record["results"]
    head = (f"{config['task']['name']}: {config['model']['name']} memory={config['memory']['name']} "
            f"N={config['model'].get('segment_len')}, {res.get('train/steps') or 0} training steps")
    extended = (config.get("hydra") or {}).get("extended_from")
    if extended:  # rerun with a larger trainer.steps: not the same as a straight run of as many steps
        head += f" (extended from {' then '.join(map(str, extended))})"
    if sources(res):
        head += ", data " + ", ".join(used if asked == used else f"{asked} -> {used}" for asked, used in sources(res).items())
    rows = [("metric", "ours", "paper / chance")] + _main_rows(config, res)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    text = [head, line]
    for i, row in enumerate(rows):
        text.append("|".join(f" {cell.rjust(w) if j == 1 else cell.ljust(w)} " for j, (cell, w) in
                             enumerate(zip(row, widths))).rstrip())
        if i == 0:
            text.append(line)
    text.append(line)
    fell = fallbacks(res)
    if fell:
        text.append(f"warning: fell back from the hub: {'; '.join(fell)}")
    files = sorted(p.name for p in Path(out_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    text.append(f"outputs: {out_dir}  ({', '.join(files)})")
    w = record.get("wandb") or {}
    if w.get("url") or w.get("dir"):
        text.append(f"W&B: {w.get('url') or 'wandb sync ' + w['dir']}")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="folders to search for results.json")
    parser.add_argument("--out", type=Path, help="markdown file to write, with its figures in report_img/ beside "
                                                 "it (default: print it, unless --csv is given)")
    parser.add_argument("--csv", type=Path, help="CSV file to write: one row per run, its overrides and numeric "
                                                 "metrics as columns")
    parser.add_argument("--task", help=f"only the runs of this task ({', '.join(options('task'))})")
    parser.add_argument("--experiment", help="only the runs made with this experiment (conf/experiment/)")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="only the runs whose folder matches PATTERN, a glob matched anywhere in the path "
                             "('mini', 'table2*linear'); repeat it to keep runs matching any of several")
    args = parser.parse_args()
    for key in ("task", "experiment"):
        value = getattr(args, key)
        if value is not None and value not in options(key):
            sys.exit(_fail(f"--{key}: {value!r} is not one of {', '.join(options(key))}", 2))
    roots = [r for r in args.roots if r.exists()]
    results = merge_reruns(select(all_runs(roots), args.task, args.experiment, args.only))
    chosen = [f"--{k} {v}" for k in ("task", "experiment") if (v := getattr(args, k))] + [f"--only {p}" for p in args.only]
    if chosen and not results:
        sys.exit(_fail(f"no run under {', '.join(map(str, args.roots))} matches {' '.join(chosen)}", 1))
    if args.csv:
        atomic_write_text(args.csv, csv_table(results))
        print(f"wrote {args.csv} ({len(results)} run{'s' * (len(results) != 1)})")
    if args.out:
        atomic_write_text(args.out, build_report(results, args.out))
        print(f"wrote {args.out}")
    elif not args.csv:
        print(build_report(results))


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main()

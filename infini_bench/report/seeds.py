"""Table 2 across seeds: LM runs of one recipe that differ only in seed, memory and ablation arm, grouped into
tables (`seed_groups`) with one row per memory or arm (`arm`); each row's mean and spread over seeds, by loss band
and against none's, where a difference counts only beyond the seeds' noise (`verdict`); and its final gates."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from infini_bench.memories import memory_names
from infini_bench.paper import TABLE2, TABLE2_MEMORY
from infini_bench.report.runs import CONF, _by_task, _fmt, _identity, _scale, _split, footprint, overrides
from infini_bench.tracking import read_metrics

ABLATIONS = CONF.parent / "docs" / "ABLATIONS.md"  # what the seed table's ablation arms test


# Loss-by-segment bands of the seed table: the first segment (no memory yet, every model computes local attention
# alone), late segments inside the 16-segment training length, and segments beyond it.
SEGMENT_BANDS = (("first segment", 0, 1), ("segments 8-15", 8, 16), ("segments 16+", 16, None))


# Overrides that turn one knob of a memory (its options, the gate's start and learning rate): runs of one recipe that
# differ only there are arms of an ablation, rows of the recipe's seed table rather than tables of their own.
# The knobs an ablation arm turns: a memory's options, the gate's start and learning rate, and how training
# windows are cut from the corpus (the evaluation is the same for all of them).
ARM_TASK_KEYS = ("train_documents", "window_start", "min_doc_tokens")
ARM_OVERRIDES = ("memory.", "model.gate_init=", "trainer.gate_lr=", *(f"task.{k}=" for k in ARM_TASK_KEYS))
# How an evaluation is batched and how far it reaches: a memory that affords less of it (full attention's prompts stop
# at 32K in make passkey-grid) is still a row of its recipe.
EVAL_EXTENT_KEYS = ("eval_batch", "lengths")


def _setting(config: dict) -> str:
    """A run's identity without its seed, memory and arm: the runs of one recipe that a seed table compares."""
    kept = json.loads(_identity(config))
    for key in ("seed", "memory", "name"):  # the run's name is made of its model and memory
        kept.pop(key, None)
    kept.get("model", {}).pop("gate_init", None)
    kept.get("model", {}).pop("init_from", None)  # the starting weights: in make passkey-grid, each seed's own base
    for key in (*ARM_TASK_KEYS, *EVAL_EXTENT_KEYS):
        kept.get("task", {}).pop(key, None)
    trainer = kept.get("trainer", {})
    for key in ("seed", "gate_lr"):
        trainer.pop(key, None)
    if "batch_size" in trainer:  # 8 sequences x 2 accumulated micro-batches is the same step as 16 x 1
        trainer["sequences_per_step"] = trainer.pop("batch_size") * trainer.pop("grad_accum", 1)
    return json.dumps(kept, sort_keys=True)


def booksum_recipe(config: dict) -> str:
    """A booksum run's setting without its seed, memory and arm (`seeds._setting`), nor the sampling seed of its
    summaries, which follows the run's seed."""
    kept = json.loads(_setting(config))
    kept.get("task", {}).pop("seed", None)
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


def by_setting(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Runs that differ only in seed, memory and arm together: {setting: {arm: runs}}."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault(_setting(r["config"]), {}).setdefault(arm(r), []).append(r)
    return groups


def seed_groups(results: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """LM runs that differ only in seed, memory and arm: {setting: {arm: runs}}, for settings where some arm has
    two seeds or more (single runs stay in the per-run table above)."""
    groups = by_setting(_by_task(results, "lm"))
    return {k: v for k, v in groups.items() if any(len(runs) > 1 for runs in v.values())}


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


def gate_history(run: dict) -> dict[int, dict[tuple[int, int], float]]:
    """{step: {(layer, head): sigmoid(beta)}} for every step a run logged its gates (metrics.jsonl), in step order;
    a step logged twice (a resumed run) keeps its latest row."""
    metrics = Path(run["path"]) / "metrics.jsonl"
    rows = [row for row in read_metrics(metrics) if any(k.startswith("gates/L") for k in row)] \
        if metrics.exists() else []
    history = {row["step"]: {(int(k.split("/")[1][1:]), int(k.split("/")[2][1:])): v for k, v in row.items()
                             if k.startswith("gates/L")} for row in rows}
    return dict(sorted(history.items()))


def final_gates(run: dict) -> dict[tuple[int, int], float]:
    """{(layer, head): sigmoid(beta)} at the last step a run logged its gates, else {}."""
    history = gate_history(run)
    return history[max(history)] if history else {}


class GateTrajectory(NamedTuple):
    steps: list[int]
    mean: list[float]    # over heads, then over seeds
    widest: list[float]  # the widest head's gate, averaged over seeds
    seeds: int


def gate_trajectory(runs: list[dict]) -> GateTrajectory | None:
    """The gates at each step that every run logging gates at two steps or more logged, averaged over those runs;
    None if none did (runs that log the gates only at the end have no trajectory)."""
    histories = [h for h in map(gate_history, runs) if len(h) > 1]
    if not histories:
        return None
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    mean = [sum(sum(h[s].values()) / len(h[s]) for h in histories) / len(histories) for s in steps]
    widest = [sum(max(h[s].values()) for h in histories) / len(histories) for s in steps]
    return GateTrajectory(steps, mean, widest, len(histories))

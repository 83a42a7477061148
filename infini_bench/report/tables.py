"""The paper's tables with our runs under its rows and columns: Table 1 (memory footprint), Table 2 (long-context
language modelling), Table 3 (passkey retrieval), Table 4 and Figure 4's length sweep (book summarisation); and the
table a run prints when it ends (`results_table`, and `headline`, its main number in a few characters).
Table 2 across seeds is in `seeds`; Figure 4 by recipe (seeds averaged, beside the oracle rows of synthetic books)
is `sweep_tables`."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from infini_bench.memories import memory_names
from infini_bench.paper import (
    FIGURE4_LENGTHS, FIGURE4_TREND, TABLE1, TABLE2, TABLE2_COMPRESSION, TABLE2_MEMORY, TABLE2_MEMORY_FLOATS,
    TABLE2_XL_CACHE, TABLE3, TABLE3_LENGTHS, TABLE4, length_label,
)
from infini_bench.report.figures import distance_figures, recall_axis, recall_by_pairs
from infini_bench.report.runs import _by_task, _fmt, _link, _ours, _pct, _scale, fallbacks, footprint, shared_overrides, sources
from infini_bench.report.seeds import _mean_spread, arm, arms_in_order, booksum_recipe

DEPTHS = ("start", "middle", "end")
HUB_COLUMNS = {"pg19": "PG19", "arxiv_math": "Arxiv-math"}


# ---- Table 1 ---------------------------------------------------------------------------------------------------------


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


# ---- Table 3 ---------------------------------------------------------------------------------------------------------


def _depth_name(row: dict) -> str:
    """A grid row's depth as the paper's column name: named (start, middle, end), or a depth sweep's 0, 0.5 and 1."""
    named = {0.0: "start", 0.5: "middle", 1.0: "end"}
    return row["depth"] if row["depth"] in DEPTHS else named.get(row.get("depth_value"), row["depth"])


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
        grid = {(row["length_label"], _depth_name(row)): row for row in rows}
        labels = list(dict.fromkeys(row["length_label"] for row in rows))
        other = "; ".join(f"{lab}: {_cell(grid, lab)}" for lab in labels if lab not in TABLE3_LENGTHS)
        steps = res.get("train/steps") or 0
        mode = "zero-shot" if c["task"].get("zero_shot") or not steps else f"fine-tuned {steps} steps"
        split = f"{_fmt(_pct(res.get('passkey/acc/earlier_segment')), 0)} / {_fmt(_pct(res.get('passkey/acc/same_segment')), 0)}"
        lines.append(f"| ours: {mode} {c['memory']['name']} | " + " | ".join(_cell(grid, lab) for lab in TABLE3_LENGTHS)
                     + f" | {other} | {_fmt(_pct(res.get('passkey/exact')), 0)} | "
                     f"{_fmt(_pct(res.get('passkey/chance')), 0)} | {split} | {_ours(r, out)} |")
    return lines + distance_figures(results, "passkey", out)


# ---- associative recall (beyond the paper) ----------------------------------------------------------------------------


def recall_table(results: list[dict], out: Path | None = None) -> list[str]:
    """task=recall runs, one row per run in the report's memory order: overall accuracy beside chance, then by
    gap and by pair count (docs/RECALL.md). The paper has no such table."""
    runs = _by_task(results, "recall")
    if not runs:
        return []
    order = {m: i for i, m in enumerate(memory_names())}
    runs = sorted(runs, key=lambda r: (order.get(r["config"]["memory"]["name"], len(order)), r["config"].get("seed", 0)))
    gaps, pairs = recall_axis(runs, "gap"), recall_axis(runs, "pairs")
    lines = ["## Associative recall across segments (beyond the paper), accuracy %", "",
             "Key-value pairs, then whole segments of filler (the gap), then every key again: a value is recalled "
             "only through what the memory carried across the gap, so local attention alone is at chance. "
             "What it measures: [RECALL.md](RECALL.md).", "",
             "| memory | seed | accuracy | chance | " + " | ".join(f"gap {g}" for g in gaps) + " | "
             + " | ".join(f"{p} pairs" for p in pairs) + " | scale, command, run |",
             "|---|" + "---|" * (4 + len(gaps) + len(pairs))]
    for r in runs:
        res = r["results"]
        cells = [_fmt(_pct(res.get(f"recall/acc@gap={g}")), 1) for g in gaps] + \
                [_fmt(_pct(res.get(f"recall/acc@pairs={p}")), 1) for p in pairs]
        lines.append(f"| {r['config']['memory']['name']} | {r['config'].get('seed', 0)} | "
                     f"{_fmt(_pct(res.get('recall/acc')), 1)} | {_fmt(_pct(res.get('recall/chance')), 1)} | "
                     + " | ".join(cells) + f" | {_ours(r, out)} |")
    return lines + recall_by_pairs(results, out) + distance_figures(results, "recall", out)


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
    return lines + sweep_tables(runs, out)


# The oracle rows of a synthetic run (docs/BOOKSUM.md): (label, key before "@", digits).
ORACLE_ROWS = (("oracle: perfect memory (every event read)", "booksum/oracle_memory/overall", 1),
               ("oracle: local attention alone (events in the last segment)", "booksum/oracle_local/overall", 1),
               ("events beyond the window (share of the book's events)", "booksum/events_beyond_window", 2))


def _lengths(runs: list[dict]) -> list[str]:
    """The input lengths of some booksum runs, shortest first, as their keys name them ('512', '2K'); for runs
    whose config lacks them, the lengths of their `booksum/overall@` keys in the order written."""
    lengths = sorted({n for r in runs for n in r["config"]["task"].get("eval_input_lens") or []})
    if lengths:
        return [length_label(n) for n in lengths]
    return list(dict.fromkeys(k.split("@", 1)[1] for r in runs for k in r["results"] if k.startswith("booksum/overall@")))


def _agreed(values: list[float], digits: int) -> str:
    """The oracle's value at one length: one number where every run of the recipe gives it (the same books and
    segments give the same oracle, whatever the seed or memory), else the mean ± half the range."""
    if values and len({round(v, digits) for v in values}) == 1:
        return f"{values[0]:.{digits}f}"
    return _mean_spread(values, digits)


def sweep_tables(runs: list[dict], out: Path | None = None) -> list[str]:
    """Figure 4 by recipe: booksum runs that differ only in seed and memory (or an ablation arm) grouped into one
    table, a row per memory with its mean over seeds ± half the range at each input length, under the oracle rows
    of synthetic books. Recipes with no oracle (hub data) and one seed per memory keep their rows above alone."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault(booksum_recipe(r["config"]), {}).setdefault(arm(r), []).append(r)
    lines: list[str] = []
    for by_arm in groups.values():
        every = [r for group in by_arm.values() for r in group]
        oracle = any(k.startswith(ORACLE_ROWS[0][1] + "@") for r in every for k in r["results"])
        if not oracle and all(len(group) < 2 for group in by_arm.values()):
            continue
        labels = _lengths(every)
        if not lines:
            lines += ["", "### Summary quality against input length by recipe, overall ROUGE", "",
                      "Runs of one recipe that differ only in seed and memory, one row per memory: the mean over "
                      "seeds ± half the range (max - min) / 2 at each input length. On synthetic books the oracle "
                      "rows come first: what a perfect memory (every event wholly in the input) and local attention "
                      "alone (the events in its last segment) would score with the same truncation and scorer, and "
                      "the share of a book's events in the input but before its last segment, the part only a "
                      "memory can carry (docs/BOOKSUM.md)."]
        first = every[0]
        source = first["results"].get("data/source") or first["config"]["task"].get("source")
        steps = sorted({int(r["results"].get("train/steps") or 0) for r in every})
        span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else None  # an equal time budget: steps differ by memory
        lines += ["", f"#### {source} books ({first['config']['task'].get('eval_split', '')}): {_scale(first, span)}", ""]
        shared = shared_overrides(every)
        if shared:  # recipes whose headings match differ here
            lines += [f"Every run: `{' '.join(shared)}`, with its memory and seed.", ""]
        lines += _sweep_header(labels)
        if oracle:
            for name, key, digits in ORACLE_ROWS:
                lines.append(f"| {name} | | " + " | ".join(
                    _agreed([r["results"][f"{key}@{n}"] for r in every if f"{key}@{n}" in r["results"]], digits)
                    for n in labels) + " | |")
            guesses = [r["results"][GUESS_KEY] for r in every if GUESS_KEY in r["results"]]
            if guesses:  # the same books give the same guess at every length
                lines.append(f"| {GUESS_ROW} | | " + " | ".join(_agreed(guesses, 1) for _ in labels) + " | |")
        lines += _memory_rows(by_arm, labels, out, _spread_cell("booksum/overall", 1))
        if any(k.startswith("booksum/rouge1@") for r in every for k in r["results"]):
            lines += ["", "ROUGE-1 / ROUGE-2 / ROUGE-L by input length, each the mean over the seeds (their overall "
                      "score above is the geometric mean of the three).", "", *_sweep_header(labels)]
            lines += _memory_rows(by_arm, labels, out, _rouge_cell)
        if any(k.startswith(RECALLED_KEY + "@") for r in every for k in r["results"]):
            lines += ["", "Events stated word for word (the share of each book's events its summary states as a "
                      "sentence of its own, averaged over books); the first row is what a perfect memory could "
                      "state, the share of the events wholly in the input.", "",
                      *_sweep_header(labels), f"| {IN_INPUT_ROW} | | " + " | ".join(_agreed(
                          [r["results"][f"{IN_INPUT_KEY}@{n}"] for r in every if f"{IN_INPUT_KEY}@{n}" in r["results"]],
                          2) for n in labels) + " | |"]
            lines += _memory_rows(by_arm, labels, out, _spread_cell(RECALLED_KEY, 2))
    return lines


GUESS_KEY, GUESS_ROW = "booksum/guess/overall", "guess: as many events, each drawn from the events' words, no reading"
RECALLED_KEY, IN_INPUT_KEY = "booksum/events_recalled", "booksum/events_in_input"
IN_INPUT_ROW = "oracle: events wholly in the input"


def _sweep_header(labels: list[str]) -> list[str]:
    return ["| row | seeds | " + " | ".join(labels) + " | runs |", "|---|---|" + "---|" * len(labels) + "---|"]


def _memory_rows(by_arm: dict[str, list[dict]], labels: list[str], out: Path | None,
                 cell: Callable[[list[dict], str], str]) -> list[str]:
    """One row per memory (or arm): its seeds, `cell(runs, length)` at each length, and a link to each run."""
    lines = []
    for label in arms_in_order(by_arm):
        group = sorted(by_arm[label], key=lambda r: r["config"].get("seed", 0))
        links = ", ".join(f"[s{r['config'].get('seed', 0)}]({os.path.relpath(r['path'], out.parent)})"
                          if out is not None else f"s{r['config'].get('seed', 0)}" for r in group)
        lines.append(f"| {label} | {', '.join(str(r['config'].get('seed', 0)) for r in group)} | "
                     + " | ".join(cell(group, n) for n in labels) + f" | {links} |")
    return lines


def _spread_cell(key: str, digits: int) -> Callable[[list[dict], str], str]:
    """A cell of `key@<length>`: the mean over the runs ± half their range."""
    return lambda group, n: _mean_spread([r["results"][f"{key}@{n}"] for r in group if f"{key}@{n}" in r["results"]],
                                         digits)


def _rouge_cell(group: list[dict], n: str) -> str:
    """'R-1 / R-2 / R-L' at length n, each the mean over the runs; '-' where a type is missing."""
    means = []
    for k in ("rouge1", "rouge2", "rougeL"):
        values = [r["results"][f"booksum/{k}@{n}"] for r in group if f"booksum/{k}@{n}" in r["results"]]
        if not values:
            return "-"
        means.append(f"{sum(values) / len(values):.1f}")
    return " / ".join(means)


# ---- figures ---------------------------------------------------------------------------------------------------------


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
    if task == "recall":  # a diagnostic beyond the paper: no cited value, chance beside the overall accuracy
        chance = _pct(res.get("recall/chance"))
        rows = [("recall/acc %", _fmt(_pct(res.get("recall/acc")), 1),
                 f"{_fmt(chance, 1)} (chance)" if chance is not None else "")]
        return rows + [(f"{k} %", _fmt(_pct(v), 1), "") for k, v in res.items()
                       if k.startswith(("recall/acc@gap=", "recall/acc@pairs=")) and isinstance(v, (int, float))]
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

"""Our numbers next to the paper's: `python -m infini_bench.report outputs multirun --out docs/REPORT.md`.

Reads every results.json under the given folders and writes one markdown table per paper table. Runs on the
embedded offline data are marked as such: they check the pipeline, they do not reproduce the paper's numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from infini_bench.paper import TABLE2, TABLE2_RULE, TABLE3, TABLE3_LENGTHS, TABLE4
from infini_bench.tracking import atomic_write_text

DEPTHS = ("start", "middle", "end")


def find_results(roots: list[Path]) -> list[dict]:
    """Every results.json below the roots, with its folder."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            data = json.loads(path.read_text())
            data["path"] = str(path.parent)
            found.append(data)
    return found


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def lm_table(runs: list[dict]) -> list[str]:
    lines = ["## Long-context language modelling (Table 2)", "",
             "| run | data | model | memory | segments x N | steps | perplexity | bits/byte | paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in TABLE2.items():
        lines.append(f"| paper: {name} | PG19 / Arxiv-math | 12 layers | | 16 x 2048 | | "
                     f"{row['pg19']} / {row['arxiv_math']} | | |")
    for r in runs:
        c, res = r["config"], r["results"]
        split = "test" if "test/ppl" in res else "val"
        data = res.get("data/source", c["task"].get("dataset"))
        hub = data.removeprefix("embedded_") if data in ("pg19", "arxiv_math") else None
        paper = TABLE2.get(TABLE2_RULE.get(c["memory"]["name"], ""), {}).get(hub) if hub else None
        segs = c["task"]["seq_len"] // c["model"]["segment_len"]
        lines.append(f"| `{Path(r['path']).name or r['path']}` | {data} ({split}) | {c['model']['name']} | "
                     f"{c['memory']['name']} | {segs} x {c['model']['segment_len']} | {res.get('train/steps')} | "
                     f"{_fmt(res.get(f'{split}/ppl'))} | {_fmt(res.get(f'{split}/bpb'))} | {_fmt(paper)} |")
    return lines


def passkey_table(runs: list[dict]) -> list[str]:
    lines = ["## Passkey retrieval (Table 3), token accuracy % at start / middle / end", "",
             "| run | " + " | ".join(TABLE3_LENGTHS) + " |", "|---|" + "---|" * len(TABLE3_LENGTHS)]
    for (mode, rule), cells in TABLE3.items():
        lines.append(f"| paper: {mode} {rule} | " + " | ".join("/".join(map(str, c)) for c in cells) + " |")
    for r in runs:
        c, res = r["config"], r["results"]
        grid = {(row["length_label"], row["depth"]): row["acc"] for row in res.get("passkey/grid", [])}
        labels = sorted({k[0] for k in grid}, key=lambda s: next(row["length"] for row in res["passkey/grid"]
                                                                   if row["length_label"] == s))
        mode = "zero-shot" if c["task"].get("zero_shot") else f"fine-tuned {res.get('train/steps')} steps"
        cells = ["/".join(_fmt(None if grid.get((lab, d)) is None else 100 * grid[(lab, d)]) for d in DEPTHS)
                 for lab in labels]
        lines.append(f"| ours: {c['model']['name']} {c['memory']['name']} {mode} (lengths {', '.join(labels)}) | "
                     + " | ".join(cells) + " |")
        if res.get("passkey/acc/earlier_segment") is not None or res.get("passkey/acc/same_segment") is not None:
            lines.append(f"|  needle in an earlier segment: {_fmt(_pct(res.get('passkey/acc/earlier_segment')))}%, "
                         f"in the question's segment: {_fmt(_pct(res.get('passkey/acc/same_segment')))}% |"
                         + " |" * (len(TABLE3_LENGTHS) - 1))
    return lines


def _pct(x):
    return None if x is None else 100 * x


def booksum_table(runs: list[dict]) -> list[str]:
    lines = ["## Book summarisation (Table 4), ROUGE F x 100", "",
             "| run | R-1 | R-2 | R-L | overall |", "|---|---|---|---|---|"]
    for name, (r1, r2, rl, overall) in TABLE4.items():
        lines.append(f"| paper: {name} | {r1} | {r2} | {rl} | {overall} |")
    for r in runs:
        c, res = r["config"], r["results"]
        src = c["task"].get("source", "")
        lines.append(f"| ours: {c['model']['name']} {c['memory']['name']} ({src}) | "
                     + " | ".join(_fmt(res.get(f"booksum/{k}")) for k in ("rouge1", "rouge2", "rougeL", "overall"))
                     + " |")
    return lines


def build_report(results: list[dict]) -> str:
    by_task: dict[str, list[dict]] = {}
    for r in results:
        by_task.setdefault(r["config"]["task"]["name"], []).append(r)
    parts = ["# infini-bench report", "",
             "Rows marked `paper:` are the paper's (arXiv 2404.07143 v2); the others are runs found under the "
             "given folders. Runs on the embedded offline data check the pipeline and are not comparable "
             "with the paper's numbers.", ""]
    for task, table in (("lm", lm_table), ("passkey", passkey_table), ("booksum", booksum_table)):
        parts += table(by_task.get(task, [])) + [""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="folders to search for results.json")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = parser.parse_args()
    text = build_report(find_results([r for r in args.roots if r.exists()]))
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()

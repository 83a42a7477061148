"""Our numbers next to the paper's: `python -m infini_bench.report outputs multirun --out docs/REPORT.md`.

Reads every results.json under the given folders (a run found twice, e.g. rerun or in a sweep, counts once: the
latest wins) and writes Tables 1-4 and the Figure 4 length sweep with the paper's rows and columns, our rows
aligned under them, and the figures. Each of our rows says its data source, scale and command, so a run on the
embedded books is never read as a PG19 number. `results_table` is the table a run prints when it ends.

`--csv runs.csv` writes one row per run (its overrides and numeric metrics) for a spreadsheet or pandas;
`--task`, `--experiment` and `--only PATTERN` (a folder glob) keep some runs out of both outputs.

The report is made of
- `runs`: reading the runs (a rerun counted once), choosing some, the CSV, and a run as a table cell;
- `tables`: Tables 1-4 and Figure 4 beside the paper's, and `results_table`, the table a run ends with;
- `seeds`: Table 2 across seeds, one row per memory or ablation arm, with the spread over seeds;
- `figures`: the plots across runs and of each seed table, in report_img/ beside the report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infini_bench.files import atomic_write_text
from infini_bench.report import figures
from infini_bench.report.runs import all_runs, csv_table, merge_reruns, options, select
from infini_bench.report.seeds import table2_seeds
from infini_bench.report.tables import recall_table, table1, table2, table3, table4


def build_report(results: list[dict], out: Path | None = None) -> str:
    parts = ["# infini-bench report", "",
             "Rows marked `paper:` are the paper's (arXiv 2404.07143 v2); the others are runs found under the given "
             "folders, each with its data source, scale and command. Runs on the embedded offline data or at small "
             "scale check the pipeline and are not comparable with the paper's numbers.", ""]
    for table in (table1, table2, table2_seeds, table3, table4, recall_table):
        if lines := table(results, out):  # a section with no runs to show is left out
            parts += lines + [""]
    if out is not None:
        parts += figures.figures(results, out) + [""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m infini_bench.report", description=__doc__.splitlines()[0])
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

"""A sweep that finishes: every job of a Hydra multirun runs even when another fails, and the sweep ends with a
table of every job's outcome (its main metric, or its one-line error) and exit code 1 if any job failed.

Jobs write their outcome to a folder the sweep names in an environment variable (launchers that start jobs in
other processes on this machine inherit it); `SweepSummary`, a Hydra callback in conf/config.yaml, makes the
folder when the sweep starts and reads it when the sweep ends.

Job folders are named by each job's overrides, so sweeps of one task share `multirun/<task>/` and a job two
sweeps have in common runs once. Hydra's `multirun.yaml` there is the latest sweep's; each sweep also keeps its own
record in `<sweep dir>/sweeps/<its name>/` (`sweep_name`: the same command line, the same folder): its
multirun.yaml, its summary table and results.csv, one row per finished job (the report's `--csv` table).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from infini_bench.report.runs import csv_table, read_run
from infini_bench.files import atomic_write_text

OUTCOMES = "INFINI_BENCH_SWEEP_OUTCOMES"  # the folder of this sweep's job outcomes


def record_outcome(job: int, overrides: list[str], ok: bool, detail: str, run_dir: str) -> None:
    """One job's outcome, when it runs inside a sweep (else nothing): ok and its main metric, or the error, and
    the job's folder."""
    folder = os.environ.get(OUTCOMES)
    if not folder or not Path(folder).is_dir():
        return
    path = Path(folder) / f"{job}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": job, "overrides": overrides, "ok": ok, "detail": detail, "run_dir": run_dir}))
    os.replace(tmp, path)


def summary_table(outcomes: list[dict]) -> str:
    """A markdown table, one row per job in job order, naming the overrides that differ between the jobs (the
    ones every job shares are listed once above it)."""
    failed = sum(not o["ok"] for o in outcomes)
    common = set.intersection(*(set(o["overrides"]) for o in outcomes)) if len(outcomes) > 1 else set()
    lines = [f"sweep: {len(outcomes)} jobs, {failed} failed", ""]
    lines += [f"every job: {' '.join(sorted(common))}", ""] if common else []
    lines += ["| job | overrides | outcome |", "|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: o["job"]):
        own = [a for a in o["overrides"] if a not in common]
        outcome = o["detail"] if o["ok"] else f"error: {o['detail']}"
        lines.append(f"| {o['job']} | {' '.join(own) or '-'} | {outcome.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def sweep_name(overrides: list[str], ignored: list[str]) -> str:
    """A sweep's own folder name, the same for the same command line: its overrides, sorted, without the `ignored`
    keys (those that do not name job folders either: logger, trainer.resume, ...), with `_` for any character
    but letters, digits and `_=.,+-`, cut to 60 characters, then a hash of them all (two long command lines that
    start alike stay apart)."""
    kept = sorted(a for a in overrides if a.lstrip("+~").partition("=")[0] not in ignored)
    text = ",".join(kept)
    readable = re.sub(r"[^\w=.,+-]", "_", text)[:60] or "defaults"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class SweepSummary(Callback):
    """Makes the outcome folder and the sweep's own record (its multirun.yaml) when a multirun starts; prints the
    table and saves it and the jobs' results.csv in the record when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        ignored = list(config.hydra.job.config.override_dirname.exclude_keys)
        self.record = sweep_dir / "sweeps" / sweep_name(list(config.hydra.overrides.task), ignored)
        self.record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, self.record / "multirun.yaml")  # the config Hydra saves as <sweep dir>/multirun.yaml
        self.folder = sweep_dir / f".outcomes-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        os.environ[OUTCOMES] = str(self.folder)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        outcomes = [json.loads(p.read_text()) for p in self.folder.glob("*.json")]
        shutil.rmtree(self.folder, ignore_errors=True)
        os.environ.pop(OUTCOMES, None)
        text = summary_table(outcomes)
        (self.record / "sweep_summary.md").write_text(text)
        finished = [read_run(Path(o["run_dir"])) for o in sorted(outcomes, key=lambda o: o["job"]) if o["ok"]]
        atomic_write_text(self.record / "results.csv", csv_table(finished))
        print(f"\n{text}saved: {self.record}/ (sweep_summary.md, results.csv, multirun.yaml)")
        if not all(o["ok"] for o in outcomes):
            sys.exit(1)

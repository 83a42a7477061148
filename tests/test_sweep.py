"""Hydra multirun: choice, range, glob and experiment sweeps run one job per value; bad values get one line."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SMALL = ["task=lm", "trainer.steps=1", "task.seq_len=64", "task.eval_max_docs=1", "task.eval_max_tokens=64",
         "trainer.progress=false", "logger=none"]


def sweep(*args, tmp_path, env: dict | None = None):
    return subprocess.run([sys.executable, "run.py", *args, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results(tmp_path) -> dict[tuple, dict]:
    found = {}
    for path in tmp_path.rglob("results.json"):
        data = json.loads(path.read_text())
        found[(data["config"]["memory"]["name"], data["config"]["model"]["segment_len"])] = data["results"]
    return found


@pytest.mark.slow
def test_a_choice_sweep_writes_one_result_per_job(tmp_path):
    proc = sweep("-m", "memory=linear,none", "model.segment_len=32,64", *SMALL, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = results(tmp_path)
    assert sorted(found) == [("linear", 32), ("linear", 64), ("none", 32), ("none", 64)]
    # Each job really ran its own configuration: another memory gives another loss, another N other segments.
    assert found[("none", 32)]["val/ppl"] != found[("linear", 32)]["val/ppl"]
    assert len(found[("linear", 32)]["val/loss_by_segment"]) == 2 and len(found[("linear", 64)]["val/loss_by_segment"]) == 1


@pytest.mark.slow
def test_range_and_glob_sweeps_expand(tmp_path):
    # *a* matches delta and linear (and no other memory), and the exclusion keeps linear
    proc = sweep("-m", "memory=glob(*a*,exclude=[delta])", "model.segment_len=range(16,64,32)", *SMALL,
                 tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(results(tmp_path)) == [("linear", 16), ("linear", 48)]


@pytest.mark.parametrize("args, message", [
    (["-m", "memory=linear,lstm"], "memory='lstm' is not one of "),
    (["-m", "experiment=lm_cpu,nope"], "experiment='nope' is not one of "),
    (["-m", "memory=glob(lin*)", "task=lm,foo"], "task='foo' is not one of booksum, lm, passkey"),
    (["memory=linear,none"], "memory: 'linear,none' is a sweep; run it with -m"),
])
def test_a_bad_sweep_value_is_one_line_before_any_job(args, message, tmp_path):
    proc = sweep(*args, tmp_path=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.slow
def test_a_value_only_the_job_can_judge_fails_that_job_in_one_line(tmp_path):
    proc = sweep("-m", "model.segment_len=32,0", *SMALL, tmp_path=tmp_path)
    assert proc.returncode == 1  # the sweep's: one of its jobs failed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.segment_len: 0 must be a positive integer" in lines[0], proc.stderr
    assert sorted(results(tmp_path)) == [("linear", 32)]  # the good job before it finished


@pytest.mark.slow
def test_a_failing_job_does_not_end_the_sweep_which_ends_with_every_jobs_outcome(tmp_path):
    args = ["-m", "model.segment_len=0,32", *SMALL]
    proc = sweep(*args, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr  # a job failed: the sweep says so in its exit code
    assert "Traceback" not in proc.stderr and "error: model.segment_len: 0 must be a positive integer" in proc.stderr
    (ppl,) = [r["val/ppl"] for (_, n), r in results(tmp_path).items() if n == 32]  # job 1 ran after job 0 failed
    (record,) = (tmp_path / "sweeps").iterdir()  # the sweep's own record
    table = (record / "sweep_summary.md").read_text()
    assert table in proc.stdout and "sweep: 2 jobs, 1 failed" in table
    assert "| 0 | model.segment_len=0 | error: model.segment_len: 0 must be a positive integer |" in table
    assert f"| 1 | model.segment_len=32 | val/ppl {ppl:.2f} |" in table
    assert "every job: " in table and "task=lm" in table.split("| job |")[0]
    assert not list(tmp_path.glob(".outcomes-*"))
    again = sweep(*args, tmp_path=tmp_path)  # rerun: the finished job reports its numbers, the bad one fails again
    assert again.returncode == 1
    assert f"| 1 | model.segment_len=32 | finished earlier: val/ppl {ppl:.2f} |" in again.stdout
    assert list((tmp_path / "sweeps").iterdir()) == [record]  # the same command line, the same record
    assert (record / "sweep_summary.md").read_text() in again.stdout
    (row,) = read_csv(record / "results.csv")  # the finished job only
    assert row["model.segment_len"] == "32" and float(row["val/ppl"]) == ppl and row["task"] == "lm"


@pytest.mark.slow
def test_a_job_that_crashes_does_not_end_the_sweep_which_records_its_error_in_one_line(tmp_path):
    """An unexpected error (a bug: injected in job 0's final evaluation) ends only its own job, with its traceback;
    job 1 still runs, the table gives job 0's error in one line, and the sweep exits with code 1."""
    crash = {"INFINI_BENCH_FAULT": "final_evaluation", "INFINI_BENCH_FAULT_SIGNAL": "RAISE"}
    proc = sweep("-m", "memory=linear,none", *SMALL, tmp_path=tmp_path, env=crash)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = "InjectedFault: injected at final_evaluation (INFINI_BENCH_FAULT)"
    assert "Traceback (most recent call last)" in proc.stderr and f"error: {error}" in proc.stderr.splitlines()
    assert [memory for memory, _ in results(tmp_path)] == ["none"]  # job 1 ran after job 0 crashed
    (record,) = (tmp_path / "sweeps").iterdir()
    table = (record / "sweep_summary.md").read_text()
    assert table in proc.stdout and "sweep: 2 jobs, 1 failed" in table
    assert f"| 0 | memory=linear | error: {error} |" in table
    assert "| 1 | memory=none | val/ppl " in table
    assert [row["memory"] for row in read_csv(record / "results.csv")] == ["none"]
    assert not list(tmp_path.glob(".outcomes-*"))


@pytest.mark.slow
def test_each_sweep_keeps_its_own_multirun_yaml_beside_the_job_folders_they_share(tmp_path):
    from omegaconf import OmegaConf

    first = sweep("-m", "memory=linear,none", *SMALL, tmp_path=tmp_path)
    second = sweep("-m", "memory=delta,linear", *SMALL, tmp_path=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert len(list(tmp_path.rglob("results.json"))) == 3  # the linear job ran once, in the first sweep
    assert "| 1 | memory=linear | finished earlier: val/ppl" in second.stdout
    records = {}
    for record in (tmp_path / "sweeps").iterdir():
        swept = OmegaConf.load(record / "multirun.yaml").hydra.overrides.task
        records[next(a for a in swept if a.startswith("memory="))] = record
        assert "sweep: 2 jobs, 0 failed" in (record / "sweep_summary.md").read_text()
    assert sorted(records) == ["memory=delta,linear", "memory=linear,none"]
    assert "memory=none" in (records["memory=linear,none"] / "sweep_summary.md").read_text()
    for memories, record in records.items():  # each sweep's results.csv: its own jobs, in job order
        rows = read_csv(record / "results.csv")
        assert [r["memory"] for r in rows] == memories.split("=")[1].split(",")
        for r in rows:
            saved = json.loads((Path(r["path"]) / "results.json").read_text())["results"]
            assert float(r["val/ppl"]) == saved["val/ppl"] and r["trainer.steps"] == "1"
    assert OmegaConf.load(tmp_path / "multirun.yaml").hydra.overrides.task[0] == "memory=delta,linear"  # Hydra's: the latest


def test_a_sweeps_record_is_named_by_its_command_line():
    from tasks.sweep import sweep_name

    ignored = ["logger", "trainer.resume"]
    name = sweep_name(["memory=linear,none", "task=lm"], ignored)
    assert name.startswith("memory=linear,none,task=lm-") and len(name) == len("memory=linear,none,task=lm-") + 8
    assert sweep_name(["task=lm", "logger=none", "memory=linear,none"], ignored) == name  # order, logger: no matter
    assert sweep_name(["memory=linear,delta", "task=lm"], ignored) != name
    odd = sweep_name(["memory=glob(*)", "model.init_from=out/a b/model.safetensors", "x=" + "9" * 100], ignored)
    assert "/" not in odd and "*" not in odd and " " not in odd and len(odd) == 60 + 9
    assert sweep_name(["x=" + "9" * 100 + "1"], []) != sweep_name(["x=" + "9" * 100 + "2"], [])
    assert sweep_name([], ignored).startswith("defaults-")


def test_the_sweep_table_names_what_differs_between_jobs():
    from tasks.sweep import summary_table

    table = summary_table([
        {"job": 1, "overrides": ["memory=none", "task=lm"], "ok": True, "detail": "val/ppl 2.00"},
        {"job": 0, "overrides": ["memory=linear", "task=lm", "seed=1"], "ok": False, "detail": "a | b"}])
    assert table.splitlines()[0] == "sweep: 2 jobs, 1 failed"
    assert "every job: task=lm" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert rows == ["| 0 | memory=linear seed=1 | error: a / b |", "| 1 | memory=none | val/ppl 2.00 |"]

"""Recipes are what they say: a paper recipe refuses to fall back to embedded data; a fallback is recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SMALL = ["model.flavour=tiny", "model.tokenizer=byte", "trainer.steps=1", "task.seq_len=64", "task.eval_max_docs=1",
         "task.eval_max_tokens=64", "trainer.progress=false", "trainer.compile=false", "trainer.batch_size=2",
         "trainer.grad_accum=1"]


def cli(*args, out):
    return subprocess.run([sys.executable, "run.py", *args, *SMALL, f"hydra.run.dir={out}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_a_paper_recipe_without_the_hub_is_one_line_naming_fallback_offline(tmp_path):
    proc = cli("experiment=table2_pg19", out=tmp_path / "run")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: task.dataset: 'pg19' (emozilla/pg19) is unavailable") and "task.fallback_offline" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_fallback_is_recorded_in_results_and_the_log(tmp_path):
    out = tmp_path / "run"
    proc = cli("task=lm", "task.dataset=pg19", "logger=none", out=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["data/fallback"] == "pg19=embedded_pg19" and results["data/eval_source"] == "embedded_pg19"
    log = (out / "run.log").read_text()  # Python logging reaches Hydra's log file
    assert "falling back to embedded_pg19" in log and "results:" in log
    assert "warning: fell back from the hub: pg19 -> embedded_pg19" in proc.stdout

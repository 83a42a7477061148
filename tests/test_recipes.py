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


def test_a_tasks_defaults_follow_the_models_scale():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def task(*overrides):
            return compose("config", overrides=list(overrides)).task

        tiny, paper = task("task=passkey"), task("task=passkey", "model=1b")
        assert (tiny.setting, list(tiny.key_range), list(tiny.lengths)) == ("tiny", [1, 9], [1024, 2048, 4096])
        assert (paper.setting, list(paper.key_range), list(paper.train_lengths)) == ("paper", [1, 50000], [5120, 5120])
        assert list(paper.lengths) == [32768, 131072, 262144, 524288, 1048576] and paper.warmup_steps == 0
        assert list(task("experiment=table3_passkey_1b").key_range) == [1, 50000]
        booksum = task("task=booksum", "model=8b")
        assert booksum.train_input_len == 32768 and booksum.max_new_tokens == 1024
        assert list(booksum.eval_input_lens)[-1] == 500000
        assert task("task=lm", "model=lm_paper").seq_len == 32768 and task("task=lm").seq_len == 512
        assert list(task("task=passkey", "model=1b", "task.setting=tiny").lengths) == [1024, 2048, 4096]
        assert task("task=passkey", "model=1b", "task.key_range=[1,99]").key_range[1] == 99  # an override wins

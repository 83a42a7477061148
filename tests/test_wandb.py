"""W&B, offline: a run read back with wandb's own reader has a name, group, job type, tags, Hydra's choices,
an x axis for every panel, its last images, its results in the summary and as an artifact; a rerun of the same
command continues the same W&B run. The gates reach W&B as one table and one image per evaluation (a stand-in
wandb module records what is logged)."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["experiment=lm_cpu", "trainer.steps=2", "trainer.eval_every=1", "trainer.ckpt_every=1", "task.seq_len=64",
        "task.eval_max_docs=1", "task.eval_max_tokens=64", "trainer.progress=false"]


def records(run_dir: Path) -> list[dict]:
    """Every record of an offline run's .wandb log, as wandb's own reader (`wandb leet inspect`) prints them."""
    wandb = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_offline_run_reads_back_with_identity_axes_images_summary_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    # The first run is killed while it saves its first checkpoint; the same command then resumes it.
    killed = subprocess.run([sys.executable, "run.py", *ARGS, f"hydra.run.dir={out}"], cwd=ROOT,
                            env={**env, "INFINI_BENCH_FAULT": "between_checkpoint_renames"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    proc = subprocess.run([sys.executable, "run.py", *ARGS, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    saved = json.loads((out / "results.json").read_text())
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    logs = [records(d) for d in offline]

    # The killed run may not have flushed its records; its folder's name ends with its id.
    assert [d.name.rsplit("-", 1)[1] for d in offline] == [saved["wandb"]["id"]] * 2
    run = next(r["run"] for r in logs[1] if r["type"] == "run")
    assert run["run_id"] == saved["wandb"]["id"] == (out / "wandb_run_id").read_text().strip()
    assert run["run_group"] == "lm_cpu" and run["job_type"] == "lm"
    assert run["display_name"].startswith("lm tiny-linear") and "trainer.steps=2" in run["display_name"]
    assert {"memory=linear", "model=tiny", "N=32"} <= set(run["tags"])
    config = run["config"]["update"]
    assert config["hydra"]["choices"]["experiment"] == "lm_cpu" and "trainer.steps=2" in config["hydra"]["overrides"]

    log = logs[1]
    metrics = [r["metric"] for r in log if r["type"] == "metric"]
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "trainer/step" for m in metrics)
    history = [r["history"]["item"] for r in log if r["type"] == "history"]
    assert [h["_step"] for h in history] == sorted(h["_step"] for h in history)  # W&B's own counter only grows
    # The last gate heatmap and the loss-by-segment table and image, logged after the final metrics, all arrive,
    # each under its own key, at the final training step.
    for key in ("gates/heatmap._type", "gates/values._type", "val/loss_by_segment._type",
                "val/loss_by_segment_plot._type"):
        assert any(key in h and h.get("trainer/step") == 2 for h in history), key
    assert not [k for h in history for k in h if re.match(r"gates/L\d+/H\d+", k)]  # no panel per head
    summary = {}
    for r in log:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["val/ppl"] == pytest.approx(saved["results"]["val/ppl"])
    assert summary["data/source"] == saved["results"]["data/source"]
    assert summary["val/loss_by_segment"]["_type"] == "table-file"
    artifacts = [r["artifact"] for r in log if r["type"] == "artifact"]
    assert any(a["type"] == "results" for a in artifacts)


def stand_in_wandb() -> types.ModuleType:
    """The part of the wandb module Run uses, keeping every row logged (in `module.rows`)."""
    module = types.ModuleType("wandb")
    module.rows = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Image:
        def __init__(self, path):
            self.path = path

    class WandbRun:
        id, project, url = "abc123", "infini-bench", None

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, row):
            module.rows.append(row)

    module.Table, module.Image, module.init = Table, Image, lambda **kwargs: WandbRun()
    return module


def test_gates_reach_wandb_as_one_table_and_an_image_and_metrics_jsonl_as_one_number_per_head(tmp_path, monkeypatch):
    from infini_bench.model import build_model
    from infini_bench.tracking import Run, read_metrics
    from tasks.common import log_gates
    from tasks.passkey import _StepOffset

    wandb = stand_in_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = build_model("tiny", memory="linear", n_layers=2)  # 2 layers of 4 heads
    run = Run(tmp_path, {"name": "tiny-linear"}, {"backend": "wandb"}, device="cpu")
    log_gates(model, run, step=5)
    log_gates(model, _StepOffset(run, 10), step=5)  # passkey's main phase, logged after its warm-up's steps

    keys = [["gates/values", "trainer/step"], ["gates/heatmap", "trainer/step"]]
    assert [sorted(row) for row in wandb.rows] == keys * 2
    assert [row["trainer/step"] for row in wandb.rows] == [5, 5, 15, 15]
    assert not [k for row in wandb.rows for k in row if re.match(r"gates/L\d+/H\d+", k)]  # no panel per head
    table = wandb.rows[0]["gates/values"]
    assert table.columns == ["layer", "head", "gate"]
    assert [(layer, head) for layer, head, _ in table.data] == [(i, j) for i in range(2) for j in range(4)]
    assert wandb.rows[1]["gates/heatmap"].path == str(tmp_path / "gates.png")
    rows = read_metrics(run.metrics_path)
    assert [row["step"] for row in rows] == [5, 15]
    assert rows[0] == {"step": 5, **{f"gates/L{i}/H{j}": g for i, j, g in table.data}}
    assert not (tmp_path / "tables").exists()  # the numbers are in metrics.jsonl already

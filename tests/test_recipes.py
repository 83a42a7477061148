"""Recipes are what they say: a paper recipe refuses to fall back to embedded data; a fallback is recorded."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

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
    assert log.count("falling back to embedded_pg19") == 1 and "results:" in log  # once, not once per split
    assert "warning: fell back from the hub: pg19 -> embedded_pg19" in proc.stdout


def test_a_tasks_defaults_follow_the_models_scale():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def task(*overrides):
            return compose("config", overrides=list(overrides)).task

        tiny, paper = task("task=passkey"), task("task=passkey", "model=1b")
        assert compose("config", overrides=["task=passkey"]).scale == "tiny"
        assert compose("config", overrides=["task=passkey", "model=1b"]).scale == "paper"
        assert (list(tiny.key_range), list(tiny.lengths)) == ([1, 9], [1024, 2048, 4096])
        assert (list(paper.key_range), list(paper.train_lengths)) == ([1, 50000], [5120, 5120])
        assert list(paper.lengths) == [32768, 131072, 262144, 524288, 1048576] and paper.local_warmup_steps == 0
        assert list(task("experiment=table3_passkey_1b").key_range) == [1, 50000]
        booksum = task("task=booksum", "model=8b")
        assert booksum.train_input_len == 32768 and booksum.max_new_tokens == 1024
        assert list(booksum.eval_input_lens)[-1] == 500000
        assert task("task=lm", "model=lm_paper").seq_len == 32768 and task("task=lm").seq_len == 512
        assert list(task("task=passkey", "model=1b", "scale=tiny").lengths) == [1024, 2048, 4096]
        assert task("task=passkey", "model=1b", "task.key_range=[1,99]").key_range[1] == 99  # an override wins


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    OmegaConf.resolve(cfg)  # as run.py does before a task starts
    return cfg


def _trainer(*overrides):
    from tasks.runner import train_config

    return train_config(_compose(*overrides))


MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
PAPER_MODELS = [model for model in MODELS if _compose(f"model={model}").scale == "paper"]


def test_each_tasks_trainer_follows_the_scale():
    assert {"1b", "8b", "lm_paper"} <= set(PAPER_MODELS)
    tiny = {task: _trainer(f"task={task}") for task in ("passkey", "booksum", "lm")}
    assert (tiny["passkey"].steps, tiny["passkey"].lr, tiny["passkey"].batch_size) == (600, 3e-3, 16)
    assert (tiny["booksum"].steps, tiny["booksum"].lr, tiny["booksum"].batch_size) == (150, 3e-3, 4)
    assert (tiny["lm"].steps, tiny["lm"].optimizer, tiny["lm"].lr, tiny["lm"].batch_size) == (300, "adamw", 3e-3, 8)
    recall = _trainer("task=recall")
    assert (recall.steps, recall.lr, recall.batch_size) == (600, 3e-3, 16)
    assert _trainer("task=recall", "model=1b") == _trainer("task=recall", "trainer=recall_paper")
    for model in PAPER_MODELS:
        passkey, booksum, lm = (_trainer(f"task={task}", f"model={model}") for task in ("passkey", "booksum", "lm"))
        assert (passkey.steps, passkey.lr, passkey.batch_size) == (400, 1e-4, 8), model
        assert booksum.lr == 1e-4 and booksum.steps == 100, model
        assert (lm.optimizer, lm.lr, lm.warmup_steps, lm.schedule, lm.batch_size * lm.grad_accum) == \
            ("adafactor", 1e-2, 1000, "cosine", 64), model
    # The whole scale moves together: scale=tiny on a paper-scale model is the tiny check, trainer too.
    assert _trainer("task=passkey", "model=1b", "scale=tiny") == tiny["passkey"]
    assert _trainer("task=lm", "model=tiny", "scale=paper").optimizer == "adafactor"
    assert _trainer("task=lm", "model=tiny", "scale=paper") == _trainer("task=lm", "trainer=lm_paper")


def test_a_command_line_trainer_choice_or_value_wins_over_the_scale():
    paper = _trainer("task=passkey", "model=1b")
    assert _trainer("task=passkey", "model=1b", "trainer.lr=5e-4") == dataclasses.replace(paper, lr=5e-4)
    assert _trainer("task=passkey", "model=1b", "trainer=passkey_tiny") == _trainer("task=passkey")
    assert _trainer("task=passkey", "trainer=passkey_paper") == paper
    assert _trainer("task=lm", "trainer=lm_paper") == _trainer("task=lm", "model=lm_paper")
    assert _compose("task=lm", "model=1b", "trainer=lm_tiny").task.seq_len == 32768  # the task keeps its scale
    default = _trainer("task=booksum", "model=8b", "trainer=default")
    assert (default.steps, default.lr, default.batch_size) == (300, 3e-3, 8)


def test_experiments_keep_their_trainer():
    continual = _trainer("experiment=continual_1b")  # trainer=continual on a paper-scale model, lm task
    assert (continual.steps, continual.lr, continual.optimizer, continual.batch_size, continual.grad_accum) == \
        (30000, 1e-4, "adamw", 16, 4)
    for name in ("table2_pg19", "table2_arxiv_math"):
        table2 = _trainer(f"experiment={name}")
        assert (table2.optimizer, table2.lr, table2.warmup_steps, table2.batch_size * table2.grad_accum) == \
            ("adafactor", 1e-2, 1000, 64), name
    mini = _trainer("experiment=table2_mini")
    assert (mini.steps, mini.optimizer, mini.batch_size, mini.grad_accum) == (700, "adamw", 8, 2)
    paper_shape = _trainer("experiment=table2_paper_shape")
    assert (paper_shape.steps, paper_shape.optimizer, paper_shape.batch_size) == (720, "adamw", 2)
    table3 = _trainer("experiment=table3_passkey_1b")
    assert (table3.steps, table3.batch_size, table3.lr, table3.precision) == (400, 8, 1e-4, "bf16")
    table4 = _trainer("experiment=table4_booksum")
    assert (table4.lr, table4.batch_size, table4.precision) == (1e-4, 1, "bf16")
    assert _trainer("experiment=lm_cpu") == dataclasses.replace(_trainer("task=lm"), eval_every=1000)
    gpu = _trainer("experiment=passkey_gpu")  # a tiny model: its own values over the tiny preset
    assert (gpu.steps, gpu.time_budget_s, gpu.lr, gpu.gate_lr, gpu.batch_size * gpu.grad_accum, gpu.precision) == \
        (100000, 330, 1e-3, 3e-2, 128, "bf16")
    base = _trainer("experiment=passkey_gpu_base")  # the same optimiser on one micro-batch of 128
    assert (base.time_budget_s, base.lr, base.batch_size, base.grad_accum) == (220, 1e-3, 128, 1)


def test_the_start_line_shows_the_values_used_once(caplog, monkeypatch):
    import tasks.runner as runner

    cfg = _compose("task=passkey", "model=1b", "task.key_range=[1,99]", "trainer.lr=5e-4")
    line = runner.setting_line(cfg)
    assert line.startswith("task=passkey at scale=paper (model=1b): lengths=")
    assert "key_range=[1, 99]" in line and "lr=0.0005" in line and "steps=400" in line
    assert "lengths=[32768, 131072, 262144, 524288, 1048576]" in line
    tiny = runner.setting_line(_compose("task=lm", "trainer.steps=7"))
    assert "scale=tiny" in tiny and "seq_len=512" in tiny and "steps=7" in tiny and "optimizer=adamw" in tiny

    cfg = _compose("task=passkey")
    for main, expected in ((True, 1), (False, 0)):  # under torchrun only rank 0 says it
        caplog.clear()
        monkeypatch.setattr(runner, "is_main_process", lambda: main)
        with caplog.at_level(logging.INFO, logger=runner.log.name):
            runner.log_setting(cfg)
            runner.build_model_and_tokenizer(cfg)
        assert sum("at scale=tiny" in r.getMessage() for r in caplog.records) == expected


TASK_NAMES = ("lm", "passkey", "booksum", "recall")
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# The interpolations a composed config keeps: the run's seed, name and cache folder; every other value is literal.
INTERPOLATED = {"cache_dir", "name", "task.seed", "trainer.seed"}


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def test_no_composed_config_holds_an_interpolated_preset():
    from hydra import compose, initialize_config_dir

    cases = [[]] + [[f"experiment={e}"] for e in EXPERIMENTS] + \
        [[f"task={t}", f"model={m}"] for t in TASK_NAMES for m in MODELS] + \
        [[f"task={t}", f"scale={s}"] for t in TASK_NAMES for s in ("tiny", "paper")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides in cases:
            cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=False)
            found = {k: v for k, v in _leaves(cfg) if isinstance(v, str) and "${" in v}
            assert not [v for v in found.values() if "presets" in v or "setting" in v], (overrides, found)
            assert set(found) <= INTERPOLATED, (overrides, found)
            assert not {"presets", "setting"} & (set(cfg["task"]) | set(cfg["trainer"])), overrides
            assert cfg["scale"] in ("tiny", "paper"), overrides


def test_no_config_file_picks_values_through_a_preset():
    for path in (ROOT / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "presets" not in text and ".setting" not in text, path


@pytest.mark.parametrize("args, expected", [
    ([], {"scale": "tiny", "trainer.steps": 600, "trainer.lr": 3e-3, "task.lengths": [1024, 2048, 4096]}),
    (["task=lm", "model=1b"], {"scale": "paper", "trainer.steps": 20000, "trainer.optimizer": "adafactor",
                               "trainer.compile": True, "task.seq_len": 32768, "task.eval_max_tokens": None}),
    (["task=booksum", "model=1b", "scale=tiny"], {"scale": "tiny", "trainer.steps": 150, "trainer.batch_size": 4,
                                                  "task.train_input_len": 512, "task.max_new_tokens": 256}),
    (["experiment=table2_pg19"], {"trainer.steps": 20000, "trainer.batch_size": 8, "trainer.lr": 1e-2,
                                  "trainer.warmup_steps": 1000, "task.seq_len": 32768}),
])
def test_cfg_job_prints_literal_values(args, expected):
    import yaml

    proc = subprocess.run([sys.executable, "run.py", "--cfg", "job", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = OmegaConf.create(yaml.safe_load(proc.stdout))  # unresolved: what the user reads
    for key, value in expected.items():
        assert OmegaConf.select(printed, key) == value, (key, OmegaConf.select(printed, key))
    for key, value in _leaves(OmegaConf.to_container(printed, resolve=False)):
        assert key in INTERPOLATED or not (isinstance(value, str) and "${" in value), (key, value)


def test_config_yaml_and_the_readme_name_every_option():
    lines = (ROOT / "conf" / "config.yaml").read_text().splitlines()
    for group in ("scale", "model", "memory", "task"):
        (line,) = [line for line in lines if line.startswith(f"  - {group}:")]
        listed = {option.split()[0] for option in line.split("#", 1)[1].split(";")[0].split("|")}
        assert listed == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}, group
    readme = (ROOT / "README.md").read_text()
    memories = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml")))
    assert f"error: memory='lstm' is not one of {memories}\n" in readme
    (row,) = [line for line in readme.splitlines() if line.startswith("| `trainer` |")]
    assert all(f"`{p.stem}`" in row for p in (ROOT / "conf" / "trainer").glob("*.yaml"))
    (row,) = [line for line in readme.splitlines() if line.startswith("| `model` |")]
    assert all(f"`{p.stem}`" in row for p in (ROOT / "conf" / "model").glob("*.yaml"))


def test_each_task_has_both_scales_and_their_trainers():
    for task in TASK_NAMES:
        for scale in ("tiny", "paper"):
            assert (ROOT / "conf" / "task" / "scale" / f"{task}_{scale}.yaml").exists(), (task, scale)
            assert (ROOT / "conf" / "trainer" / f"{task}_{scale}.yaml").exists(), (task, scale)
        values = OmegaConf.load(ROOT / "conf" / "task" / f"{task}.yaml").task
        missing = [k for k in values if OmegaConf.is_missing(values, k)]
        for scale in ("tiny", "paper"):  # a scale sets exactly the values its task leaves as ???
            assert sorted(OmegaConf.load(ROOT / "conf" / "task" / "scale" / f"{task}_{scale}.yaml")) == sorted(missing)


def test_a_run_stored_with_presets_resumes_under_scale(tmp_path):
    from infini_bench.errors import ConfigError
    from infini_bench.checkpoint import check_same_config

    now = OmegaConf.to_container(_compose("task=lm", "model=1b"), resolve=True)
    old = json.loads(json.dumps(now))
    old.pop("scale")
    old["model"]["scale"] = old["task"]["setting"] = old["trainer"]["setting"] = "paper"
    old["task"]["presets"] = {"tiny": {"seq_len": 512}, "paper": {"seq_len": 32768}}
    old["trainer"]["presets"] = {"tiny": {"steps": 300}, "paper": {"steps": 20000}}
    assert check_same_config(now, old, tmp_path) is None
    old["task"]["seq_len"] = 512  # a value, not a name, still stops it
    with pytest.raises(ConfigError, match="task.seq_len"):
        check_same_config(now, old, tmp_path)

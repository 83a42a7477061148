"""The Hydra command line: configs compose, bad input gets one line and exit code 2, runs write results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from infini_bench.memories import memory_names

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(*args, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.parametrize("args, message", [
    (["task=foo"], "task='foo' is not one of booksum, lm, passkey"),
    (["memory=lstm"], "memory='lstm' is not one of delta, full, linear"),
    (["task=lm", "model.segment_len=0"], "model.segment_len: 0 must be a positive integer"),
    (["task=lm", "trainer.optimizer=sgd"], "trainer.optimizer: 'sgd' is not one of adamw, adafactor"),
    (["task=lm", "task.seq_len=100000000"], "task.seq_len: 100000000 does not fit the training text"),
    (["task=lm", "task.dataset=pg19", "task.fallback_offline=false"], "task.dataset: 'pg19' (emozilla/pg19) is unavailable"),
    (["task=lm", "trainer.stepz=3"], "trainer.stepz"),
    (["task=lm", "trainer.compile=maybe"], "trainer.compile: 'maybe' is not one of true, false"),
    (["task=lm", "model.arch={dimm:64}"], "model.arch.dimm: is not a model field"),
    (["task=recall", "model.arch={token_shift:1}"], "model.arch.token_shift: 1 is not one of true, false"),
    (["task=lm", "task.mix={pg19:0}"], "task.mix.pg19: 0 must be a number > 0"),
    (["task=lm", "task.min_doc_tokens=-1"], "task.min_doc_tokens: -1 must be an integer >= 0"),
    (["task=lm", "task.train_documents=files"], "task.train_documents: 'files' is not one of package, file"),
    (["task=lm", "model.init_from=nowhere.safetensors"], "model.init_from: 'nowhere.safetensors' is not a file"),
    (["task=lm", "model.init_from=README.md"], "model.init_from: 'README.md' does not fit this model"),
    (["task=lm", "seed=abc"], "seed: 'abc' must be an integer >= 0"),
    (["task=lm", "trainer.lrr=1"], "trainer.lrr: is not a trainer option; accepted: batch_size, ckpt_every"),
    (["task=lm", "trainer.lr=1e39"], "trainer.lr: 1e+39 overflows float32"),
    (["task=lm", "model.gate_init=nan"], "model.gate_init: nan must be a finite number"),
    (["task=lm", "logger=wandb", "logger.mode=onlin"], "logger.mode: 'onlin' is not one of offline, online, disabled"),
    (["task.warmup_steps=5"], "task.warmup_steps: was renamed task.local_warmup_steps (passkey's warm-up on local "
                              "attention; trainer.warmup_steps is the learning rate's)"),
    (["-m", "task.warmup_segment_len=64,128"],
     "task.warmup_segment_len: was renamed task.local_warmup_segment_len"),
    (["task.setting=tiny"], "task.setting: was renamed scale (tiny | paper; each model sets its own"),
    (["model.scale=paper"], "model.scale: was renamed scale (tiny | paper; each model sets its own"),
    (["scale=huge"], "scale='huge' is not one of paper, tiny"),
    (["task=lm", "trainer=paper_lm"], "trainer='paper_lm' is not one of booksum_paper, booksum_tiny, continual, "
                                      "default, lm_paper, lm_tiny, passkey_paper, passkey_tiny"),
    (["task=lm", "task.limit=0"], "task.limit: 0 must be null (task.eval_max_docs) or an integer >= 1"),
    (["task=booksum", "task.limit=all"], "task.limit: 'all' must be null (task.eval_books) or an integer >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc, out = cli(*args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("bad", ["trainer.lr=abc", "task.dataset=wikitext"])
def test_a_job_that_cannot_run_starts_no_wandb_run(bad, tmp_path):
    """Values only the job can judge are still judged before wandb.init: no offline W&B run, no folder."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", "task=lm", "logger=wandb", bad, f"hydra.run.dir={out}"],
                          cwd=ROOT, env={**ENV, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad.split('=')[0]}: "), proc.stderr[-2000:]
    assert not out.exists()  # no wandb/ folder, nothing else either


def test_more_memory_than_the_machine_has_is_one_line_naming_the_batch(tmp_path):
    proc, out = cli("task=lm", "trainer.steps=2", "task.seq_len=64", "trainer.batch_size=1000000000000", "logger=none",
                    "trainer.progress=false",
                    tmp_path=tmp_path / "run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.batch_size: out of memory")
    assert not (out / "results.json").exists()


def test_tiny_lm_run_writes_results_and_resumes(tmp_path):
    args = ["task=lm", "trainer.steps=4", "trainer.ckpt_every=2", "trainer.eval_every=2", "task.seq_len=128",
            "task.eval_max_docs=1", "task.eval_max_tokens=256", "trainer.progress=false"]
    proc, out = cli(*args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["memory"]["name"] == "linear"
    r = results["results"]
    assert r["val/ppl"] > 1 and r["val/bpb"] > 0 and r["footprint/state_floats"] == 32 * 33 * 2 * 2
    assert len(r["val/loss_by_segment"]) == 4  # 256 tokens in segments of 64
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/ppl" in row for row in rows) and any("gates/L0/H0" in row for row in rows)
    assert (out / "gates.png").exists() and (out / "loss_by_segment.png").exists()
    before = (out / "results.json").read_text(), (out / "metrics.jsonl").read_text()
    again, _ = cli(*args, tmp_path=tmp_path)  # the same command finds the run finished: it reports and exits
    assert again.returncode == 0 and "had finished" in again.stdout, again.stderr
    assert ((out / "results.json").read_text(), (out / "metrics.jsonl").read_text()) == before
    assert "the checkout is now at" not in again.stdout  # made by this checkout's code
    record = json.loads(before[0])
    if record["environment"]["git_commit"] is not None:  # a clone: results of another commit are called stale
        record["environment"]["git_commit"] = "0123456789" * 4
        (out / "results.json").write_text(json.dumps(record))
        stale, _ = cli(*args, tmp_path=tmp_path)
        now = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        assert f"had finished, with the code at 0123456789; the checkout is now at {now[:10]}" in stale.stdout


@pytest.mark.parametrize("task", ["lm", "passkey", "booksum", "recall"])
@pytest.mark.parametrize("model", ["tiny", "lm_paper"])
@pytest.mark.parametrize("memory", memory_names())
def test_every_task_model_memory_composes(task, model, memory):
    if not (ROOT / "conf" / "task" / f"{task}.yaml").exists():
        pytest.skip(f"task {task} not configured")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}", f"model={model}", f"memory={memory}"])
    assert cfg.task.name == task and cfg.memory.name == memory and cfg.model.name == model


def test_model_arch_overrides_any_flavour_field():
    from tasks.runner import model_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=lm_paper", "model.arch={dim:64,n_layers:3}"])
    arch = model_config(cfg)
    assert (arch.dim, arch.n_layers, arch.n_heads) == (64, 3, 8)  # the rest stays the flavour's


@pytest.mark.parametrize("experiment, seq_len", [("continual_1b", 4096), ("continual_8b", 8192)])
def test_continual_recipes_are_the_papers(experiment, seq_len):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    assert cfg.task.name == "lm" and cfg.model.segment_len == 2048 and cfg.task.seq_len == seq_len
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 64 and cfg.trainer.steps == 30000
    assert cfg.trainer.lr == 1e-4 and cfg.task.min_doc_tokens == 4096
    assert sorted(cfg.task.mix) == ["arxiv_math", "c4", "pg19"]


def test_the_run_folder_names_the_experiment(tmp_path):
    """Two recipes with the same other overrides must not share a folder (and so resume each other's runs)."""
    args = ["experiment=lm_cpu", "trainer.steps=1", "task.seq_len=64", "task.eval_max_docs=1",
            "task.eval_max_tokens=64", "trainer.progress=false", "logger=none"]
    folder = f"hydra.run.dir={tmp_path}/${{hydra:job.override_dirname}}"
    proc = subprocess.run([sys.executable, "run.py", *args, folder], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (folder,) = [p.name for p in tmp_path.iterdir()]
    assert "experiment=lm_cpu" in folder and "logger" not in folder


@pytest.mark.parametrize("task", ["lm", "passkey", "booksum", "recall"])
def test_a_trainer_chosen_on_the_command_line_wins_over_the_tasks_default(task):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        default = compose("config", overrides=[f"task={task}"])
        chosen = compose("config", overrides=[f"task={task}", "trainer=continual"])
    assert default.trainer.steps < 1000  # each task's CPU-sized preset
    assert (chosen.trainer.steps, chosen.trainer.lr, chosen.trainer.batch_size) == (30000, 1e-4, 64)


TORCHRUN_CASES = {
    "lm": ["task=lm", "trainer.steps=2", "trainer.batch_size=4", "task.seq_len=128", "task.mix={pg19:1,c4:1}",
           "task.min_doc_tokens=1000", "task.eval_max_docs=1", "task.eval_max_tokens=256", "trainer.eval_every=1"],
    "passkey": ["task=passkey", "trainer.steps=2", "task.local_warmup_steps=0", "task.lengths=[300]",
                "task.samples=2", "task.val_samples=2", "task.train_lengths=[250,260]", "trainer.batch_size=2",
                "trainer.eval_every=1"],
    "booksum": ["task=booksum", "trainer.steps=2", "trainer.batch_size=2", "task.eval_input_lens=[128,256]",
                "task.eval_books=2", "task.max_new_tokens=8", "task.synthetic.train_books=8",
                "task.train_input_len=128", "trainer.eval_every=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TORCHRUN_CASES))
def test_two_rank_run_equals_one_process(task, tmp_path):
    """Under torchrun (2 gloo ranks, FSDP2) a task trains, validates mid-training, exports its weights and
    evaluates (cached decoding on a gathered replica), with the numbers of a single process."""
    args = [*TORCHRUN_CASES[task], "trainer.progress=false", "logger=none"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    results = {}
    for name, prefix in (("two", launcher), ("one", [sys.executable])):
        out = tmp_path / name
        proc = subprocess.run([*prefix, "run.py", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.safetensors").exists()
        results[name] = json.loads((out / "results.json").read_text())["results"]
    two, one = results["two"], results["one"]
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4)
    for key, value in one.items():  # every computed number; how long training took is not one
        if isinstance(value, float) and key not in ("train/loss", "train/seconds"):
            assert two[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


def test_a_run_folder_name_over_the_limit_is_one_line(tmp_path):
    proc, _ = cli("task=lm", tmp_path=tmp_path / ("x" * 300))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: hydra.run.dir: "), proc.stderr
    assert "File name too long" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    proc, out = cli("task=lm", "device=cuda", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: device: 'cuda' but no GPU is visible to torch; use device=cpu or device=auto")
    assert not out.exists()


EVAL_ONLY = {  # a small evaluation per task, a metric it reports, and how many items it evaluated
    "lm": (["task.eval_max_tokens=128"], "val/ppl", lambda r: r["val/docs"]),
    "passkey": (["task.lengths=[300]"], "passkey/acc", lambda r: max(row["n"] for row in r["passkey/grid"])),
    "booksum": (["task.eval_input_lens=[128]", "task.max_new_tokens=4"], "booksum/overall",
                lambda r: r["booksum/books"]),
    "recall": (["task.eval_pairs=[1]", "task.eval_gaps=[1]"], "recall/acc", lambda r: r["recall/grid"][0]["n"]),
}


def gated_weights(task: str, folder: Path, raw_gate: float) -> Path:
    """A tiny model for `task` with every gate set to raw_gate, exported as a run exports it."""
    from types import SimpleNamespace

    from tasks.common import export_weights
    from tasks.runner import build_model_and_tokenizer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model, _ = build_model_and_tokenizer(compose("config", overrides=[f"task={task}"]))
    with torch.no_grad():
        for layer in model.gate_layers():
            model.layers[layer].attn.gate.fill_(raw_gate)
    folder.mkdir(parents=True)
    return export_weights(model, SimpleNamespace(out_dir=folder, is_main=True))


@pytest.mark.parametrize("task", sorted(EVAL_ONLY))
def test_evaluating_a_checkpoint_trains_nothing_and_builds_no_training_data(task, tmp_path):
    """trainer.steps=0 model.init_from=<weights>, in the run folder the config names: the checkpoint's weights
    are the ones evaluated, no training data is built and no step is trained, the folder's name holds a short
    name for the checkpoint instead of its path, and the same command again finds the run finished. task.limit=1
    evaluates one document, sample per cell or book, where the task's own setting has more."""
    from tasks.runner import EVAL_COUNT

    weights = gated_weights(task, tmp_path / "exported" / "tiny-run", raw_gate=2.0)
    args, metric, count = EVAL_ONLY[task]
    command = [sys.executable, str(ROOT / "run.py"), f"task={task}", "trainer.steps=0", f"model.init_from={weights}",
               *args, "task.limit=1", "trainer.progress=false", "logger=none"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / task / "tiny-linear").iterdir()
    assert str(weights) not in out.name and "model.init_from=tiny-run-" in out.name and len(out.name) < 150
    record = json.loads((out / "results.json").read_text())
    assert isinstance(record["results"][metric], float) and record["results"]["train/steps"] == 0
    assert count(record["results"]) == 1 < record["config"]["task"][EVAL_COUNT[task]]
    assert not (out / "train_tokens.json").exists() and not (out / "checkpoints").exists()
    assert not (out / "model.safetensors").exists()  # nothing trained, nothing exported
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("train/loss" in row or "train/lr" in row for row in rows)  # no training phase logged a step
    gates = {k: v for row in rows for k, v in row.items() if k.startswith("gates/")}
    assert gates and all(v == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item()) for v in gates.values())
    assert "evaluation only" in (out / "run.log").read_text()
    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "this run had finished" in again.stdout, again.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / task / "tiny-linear").iterdir()] == [out.name]


def test_the_run_folder_leaves_out_a_step_count_and_shortens_init_from():
    from tasks.cli import run_folder, short_name

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        exclude = list(compose("config", return_hydra_config=True).hydra.job.config.override_dirname.exclude_keys)
    weights = "outputs/continual/1b-linear/model.safetensors"
    name = short_name(weights)
    assert name.startswith("1b-linear-") and len(name) == len("1b-linear-") + 8 and name == short_name(weights)
    assert short_name("outputs/continual/1b-delta/model.safetensors") != name
    assert run_folder(["task=lm", "trainer.steps=50", "logger=none", f"model.init_from={weights}"], exclude) == \
        f"model.init_from={name},task=lm"  # more steps extend the run in its folder
    assert run_folder(["task=lm", "trainer.steps=0"], exclude) == "task=lm,trainer.steps=0"  # an evaluation: its own
    assert run_folder(["task=lm", "cache_dir=/scratch/cache"], exclude) == "task=lm"  # where tokens are kept
    assert run_folder(["trainer.steps=50", "task=lm"], exclude, "sweep") == "task=lm,trainer.steps=50"  # one per job


def test_a_finished_run_rerun_with_more_steps_trains_on_from_its_checkpoint(tmp_path):
    """2 steps, then the same command with 4: steps 3 and 4 are trained from the step-2 checkpoint, results.json
    is rewritten and the 2-step one kept beside it. Against a straight 4-step run: the same batches, the same
    first two losses (one update, at the same rate) and the same rate at steps 3 and 4 (the schedule is laid
    over the new total); not the same rate at step 2 (it followed the 2-step cosine), so not the same losses
    from step 3 on, nor the same final numbers. Fewer steps than the run has is refused."""
    args = ["task=lm", "task.seq_len=64", "task.eval_max_docs=1", "task.eval_max_tokens=64", "trainer.warmup_steps=0",
            "trainer.log_every=1", "trainer.progress=false", "logger=none"]
    first, out = cli(*args, "trainer.steps=2", tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    two_steps = (out / "results.json").read_text()
    moved = tmp_path / "moved"  # another cache_dir: the run's tokens are made again there, the same to the byte
    extended, _ = cli(*args, "trainer.steps=4", f"cache_dir={moved}", tmp_path=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    (entry,) = (moved / "tokens").iterdir()
    pinned = json.loads((out / "train_tokens.json").read_text())["streams"]["embedded_pg19"]
    assert torch.load(entry, weights_only=True)["sha256"] == pinned["sha256"]
    assert f"extending the run in {out} from 2 to 4 training steps" in extended.stdout
    assert f"resumed from {out / 'checkpoints' / 'last'} at step 2" in extended.stdout
    assert "the first 2 followed the 2-step schedule" in extended.stdout  # what it does with the learning rate
    assert (out / "results.step2.json").read_text() == two_steps
    record = json.loads((out / "results.json").read_text())
    assert record["results"]["train/steps"] == 4 and record["config"]["hydra"]["extended_from"] == [2]
    assert "4 training steps (extended from 2)" in extended.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/lr" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # steps 1-2 from the first run, once each

    straight, straight_out = cli(*args, "trainer.steps=4", tmp_path=tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_rows = [json.loads(line) for line in (straight_out / "metrics.jsonl").read_text().splitlines()
                     if "train/lr" in line]
    assert [r["train/loss"] for r in train_rows[:2]] == [r["train/loss"] for r in straight_rows[:2]]
    assert [r["train/lr"] for r in train_rows[2:]] == [r["train/lr"] for r in straight_rows[2:]]
    assert train_rows[1]["train/lr"] < straight_rows[1]["train/lr"]  # the 2-step cosine had decayed further
    assert train_rows[2]["train/loss"] != straight_rows[2]["train/loss"]
    straight_results = json.loads((straight_out / "results.json").read_text())["results"]
    assert record["results"]["val/ppl"] != straight_results["val/ppl"]

    before = (out / "results.json").read_text()
    shorter, _ = cli(*args, "trainer.steps=3", tmp_path=tmp_path)
    lines = shorter.stderr.strip().splitlines()
    assert shorter.returncode == 2 and len(lines) == 1, shorter.stderr
    assert lines[0].startswith("error: trainer.steps: 3 is fewer than the 4 steps of the run in ")
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("task, own", [("lm", "eval_max_docs"), ("passkey", "samples"), ("booksum", "eval_books"),
                                       ("recall", "samples")])
def test_task_limit_caps_each_tasks_own_count_of_evaluation_items(task, own):
    from tasks.runner import eval_count

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def count(*overrides):
            return eval_count(compose("config", overrides=[f"task={task}", f"task.{own}=5", *overrides]).task)

        assert (count(), count("task.limit=null"), count("task.limit=2"), count("task.limit=50")) == (5, 5, 2, 5)


def hydra(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """run.py from a folder of its own, so that any run folder it made (outputs/, multirun/) would show there."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, env, shown", [
    (["-sc", "install=bash"], {}, "hydra_bash_completion()"),
    (["--shell-completion", "query=bash"], {"COMP_LINE": "python run.py memory="}, "memory=delta memory=full"),
    (["--hydra-help"], {}, "--cfg,-c : Show config instead of running [job|hydra|all]"),
    (["--cfg", "job", "memory=delta"], {}, "name: ${model.name}-${memory.name}\n"),
    (["--cfg", "job", "--resolve", "memory=delta"], {}, "name: tiny-delta\n"),
    (["--cfg", "job", "-p", "memory", "memory=delta"], {}, "# @package memory\nname: delta\n"),
    (["--info", "defaults"], {}, "memory/linear"),
    (["--version"], {}, "Hydra 1."),
])
def test_hydras_own_flags_print_and_leave_no_folder(args, env, shown, tmp_path):
    proc = hydra(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shown in proc.stdout, proc.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_groups_each_task_memory_and_model_and_the_readmes_examples(tmp_path):
    proc = hydra("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for group in ("experiment", "logger", "memory", "model", "task", "trainer"):
        assert any(line.startswith(f"{group}: ") for line in lines), group
    described = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    expected = {"task": ["lm", "passkey", "booksum", "recall"], "memory": memory_names(),
                "model": [p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")]}
    for group, names in expected.items():
        for name in names:
            assert len(described.get(name, "")) > 10, f"{group}={name} has no line in --help"
    assert described["lm"] == "Long-context language modelling (paper Table 2)"
    assert described["delta"] == "Infini-attention with the delta memory update (paper Eq. 9)"
    assert described["txl"] == "Transformer-XL (Dai et al. 2019)"  # not cut at `et al.`
    readme = (ROOT / "README.md").read_text().split("## The command line", 1)[1].split("```")[1]
    examples = [line for line in readme.splitlines() if line.startswith("python run.py")]
    assert len(examples) >= 3 and all(line in lines for line in examples)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--help"]])
def test_a_bad_value_beside_a_printing_flag_is_still_one_line_and_makes_no_folder(args, tmp_path):
    proc = hydra(*args, "memory=lstm", cwd=tmp_path)
    memories = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml")))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: memory='lstm' is not one of {memories}"]
    assert list(tmp_path.iterdir()) == []

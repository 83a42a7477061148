"""Runs that never lose work: kills, crashes and signals at chosen points, then resume, or one clear line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infini_bench.checkpoint import Checkpointer
from infini_bench.data import TokenStream, embedded_documents
from infini_bench.errors import ConfigError
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.tracking import Run, read_metrics
from infini_bench.train import TrainConfig, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def setup(folder: Path, memory: str = "linear", **overrides):
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, n_layers=1, memory=memory)
    stream = TokenStream(embedded_documents("embedded_pg19", "validation"), ByteTokenizer(), seq_len=48,
                         batch_size=2, seed=0)
    run = Run(folder, {"task": "test", "memory": memory}, device="cpu")
    cfg = TrainConfig(**{"steps": 4, "batch_size": 2, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1,
                         "eval_every": 100, "progress": False, **overrides})
    return model, stream, run, cfg


def steps_logged(run: Run) -> list[int]:
    return [r["step"] for r in read_metrics(run.metrics_path)]


def losses(run: Run) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run.metrics_path) if "train/loss" in r]


class Killed(Exception):
    pass


def dies_at(stream, index: int):
    def batch(i):
        if i == index:
            raise Killed
        return stream(i)
    return batch


def cli(*args, out: Path, env=ENV):
    return subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


TINY_LM = ["task=lm", "trainer.steps=2", "trainer.ckpt_every=1", "task.seq_len=64", "task.eval_max_docs=1",
           "task.eval_max_tokens=64", "trainer.progress=false", "logger=none"]


# 1. A config error deletes nothing it did not create.
def test_config_error_keeps_what_the_folder_held(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = cli("task=lm", "trainer.lr=abc", out=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: trainer.lr"), proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    proc = cli("task=lm", "task.seq_len=0", out=fresh)
    assert proc.returncode == 2 and not fresh.exists()  # a folder this run made, holding nothing: gone
    for held in ({}, {"run.log": "mine\n"}):  # a folder the user made: empty, or holding their own run.log
        made = tmp_path / f"made{len(held)}"
        made.mkdir()
        for name, text in held.items():
            (made / name).write_text(text)
        proc = cli("task=lm", "trainer.grad_clip=0", out=made)
        assert proc.returncode == 2 and proc.stderr.startswith("error: trainer.grad_clip"), proc.stderr
        assert made.is_dir() and {p.name for p in made.iterdir()} == set(held)  # as it was
        assert all((made / n).read_text().startswith(t) for n, t in held.items())


# 2. memory=none: the gate gets no gradient, so the optimizer holds no state for it; resume still works.
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_memory_none_resumes_exactly(tmp_path, optimizer):
    model, stream, run, cfg = setup(tmp_path / "straight", "none", optimizer=optimizer)
    train(model, cfg, stream, run, tmp_path / "straight" / "ckpt")
    model, stream, run, cfg = setup(tmp_path / "killed", "none", optimizer=optimizer)
    with pytest.raises(Killed):
        train(model, cfg, dies_at(stream, 3), run, tmp_path / "killed" / "ckpt")
    model, stream, run, cfg = setup(tmp_path / "killed", "none", optimizer=optimizer)
    train(model, cfg, stream, run, tmp_path / "killed" / "ckpt")
    assert losses(run) == losses(Run(tmp_path / "straight", {}, device="cpu"))


# 3. A kill between the two renames of the checkpoint swap; a half-deleted last.old.
SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_faults import setup, losses
from infini_bench.train import train
model, stream, run, cfg = setup(__import__("pathlib").Path({folder!r}))
train(model, cfg, stream, run, run.out_dir / "ckpt")
print(json.dumps(losses(run)))
"""


def test_kill_between_checkpoint_renames_resumes_from_the_newer(tmp_path):
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), folder=str(tmp_path / "run"))
    killed = subprocess.run([sys.executable, "-c", script], env={**ENV, "INFINI_BENCH_FAULT":
                            "between_checkpoint_renames"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.old", "last.tmp"]  # neither named last
    resumed = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout  # last.tmp held step 4, complete
    assert sorted(p.name for p in ckpt.iterdir()) == ["last"]
    model, stream, run, cfg = setup(tmp_path / "straight")
    train(model, cfg, stream, run, tmp_path / "straight" / "ckpt")
    assert json.loads(resumed.stdout.splitlines()[-1]) == losses(run)


def test_a_half_deleted_old_checkpoint_does_not_block_the_next(tmp_path):
    model, stream, run, cfg = setup(tmp_path)
    with pytest.raises(Killed):
        train(model, cfg, dies_at(stream, 3), run, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "last.old").mkdir()  # killed while deleting last.old: some of its files are left
    (tmp_path / "ckpt" / "last.old" / "__0_0.distcp").write_bytes(b"left over")
    model, stream, run, cfg = setup(tmp_path)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    assert Checkpointer(tmp_path / "ckpt").load(build_model("tiny", segment_len=16, n_layers=1))["step"] == 4
    assert not (tmp_path / "ckpt" / "last.old").exists()


# 4. A finite loss with an Inf gradient: never stepped on, never saved.
def test_nonfinite_gradient_stops_before_the_step_and_the_checkpoint_stays_good(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=6)
    poisoned = []
    model.lm_head.weight.register_hook(lambda g: g * float("inf") if poisoned else g)

    def batch(i):
        if i == 3:  # step 4 is saved (ckpt_every=2): its loss is finite, its gradient is not
            poisoned.append(i)
        return stream(i)

    with pytest.raises(TrainingDiverged, match=r"train/grad_norm is (nan|inf) at step 4; .*last good checkpoint"):
        train(model, cfg, batch, run, tmp_path / "ckpt")
    fresh = build_model("tiny", segment_len=16, n_layers=1)
    assert Checkpointer(tmp_path / "ckpt").load(fresh)["step"] == 2
    assert all(torch.isfinite(v).all() for v in fresh.state_dict().values())


# 5. Resuming a folder with another config is refused; 6. a finished run reports and exits; 7. one run per folder.
def test_resume_with_another_config_is_refused_in_one_line(tmp_path):
    first = cli(*TINY_LM, out=tmp_path)
    assert first.returncode == 0, first.stderr
    hydra = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}  # the run's config and overrides
    before = (tmp_path / "results.json").read_text(), (tmp_path / "metrics.jsonl").read_text()
    for change, key in (("memory=delta", "memory.name"), ("model.arch={dim:32}", "model.arch.dim")):
        proc = cli(*TINY_LM, change, out=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: {key}: ") and "trainer.resume=false" in lines[0]
    assert ((tmp_path / "results.json").read_text(), (tmp_path / "metrics.jsonl").read_text()) == before
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == hydra  # not the refused run's


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(tmp_path / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- the running job's overrides\n")
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli(*TINY_LM, out=tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / ".lock").exists()  # the other run's, kept
    assert [p.name for p in (tmp_path / ".hydra").iterdir()] == ["overrides.yaml"]  # as the running job left it
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == "- the running job's overrides\n"


# 6. Metrics never hold a step twice.
def test_no_step_logged_twice_after_a_kill_before_the_first_checkpoint(tmp_path):
    model, stream, run, cfg = setup(tmp_path, ckpt_every=3)
    with pytest.raises(Killed):
        train(model, cfg, dies_at(stream, 2), run, tmp_path / "ckpt")
    assert steps_logged(run) == [1, 2]
    model, stream, run, cfg = setup(tmp_path, ckpt_every=3)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    assert steps_logged(run) == [1, 2, 3, 4]


def test_no_step_logged_twice_after_a_restart_or_a_crash_after_training(tmp_path):
    model, stream, run, cfg = setup(tmp_path)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    trained = read_metrics(run.metrics_path)
    run.log({"val/ppl": 9.0}, step=4)  # the task's final row; then a crash before results.json
    model, stream, run, cfg = setup(tmp_path)
    train(model, cfg, stream, run, tmp_path / "ckpt")  # resumes at the end: the final row is logged again after
    assert read_metrics(run.metrics_path) == trained
    model, stream, run, cfg = setup(tmp_path, resume=False)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    assert steps_logged(run) == [1, 2, 3, 4]


# Clear errors: SIGINT saves the steps done, then stops with one line.
def test_sigint_saves_a_checkpoint_then_stops(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=6, ckpt_every=100)

    def interrupted_at_3(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return stream(i)

    from infini_bench.train import Interrupted

    with pytest.raises(Interrupted, match=r"^interrupted at step 3; .*rerun the same command to resume$"):
        train(model, cfg, interrupted_at_3, run, tmp_path / "ckpt")
    assert Checkpointer(tmp_path / "ckpt").load(build_model("tiny", segment_len=16, n_layers=1))["step"] == 3


def test_a_second_sigint_stops_at_once_and_keeps_the_last_complete_checkpoint(tmp_path, capfd):
    """Ctrl-C twice in one step: the step is not finished, the checkpoint of step 2 is left as it was, the message
    says so in one line, and the same command resumes from it to the losses of an uninterrupted run."""
    from infini_bench.train import Interrupted

    model, stream, run, cfg = setup(tmp_path / "run", steps=6, ckpt_every=2)
    finished = []

    def twice_in_step_4(i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGINT)  # stop after this step...
            os.kill(os.getpid(), signal.SIGINT)  # ...no: now
            finished.append(i)
        return stream(i)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stopped:
        train(model, cfg, twice_in_step_4, run, tmp_path / "ckpt")
    assert str(stopped.value) == (f"interrupted again: stopped at once; the last complete checkpoint, "
                                  f"{tmp_path / 'ckpt' / 'last'} at step 2, is intact: rerun the same command to "
                                  "resume from it")
    assert finished == [] and steps_logged(run) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # the handler training found is back
    assert "Ctrl-C: stopping after this step, with a checkpoint; Ctrl-C again stops at once" in capfd.readouterr().err

    model, _, run, _ = setup(tmp_path / "run", steps=6, ckpt_every=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")  # the rerun: from step 2
    straight_model, _, straight, _ = setup(tmp_path / "straight", steps=6, ckpt_every=2)
    train(straight_model, cfg, stream, straight, tmp_path / "straight_ckpt")
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6] and losses(run) == losses(straight)


def test_a_second_sigint_while_a_checkpoint_is_swapped_in_names_the_complete_one(tmp_path, monkeypatch):
    """The first Ctrl-C arrives while step 4 is saved, the second between the renames of step 5's swap: the
    newer checkpoint is complete, the message names it, and the rerun resumes from it."""
    from infini_bench.train import Interrupted

    model, stream, run, cfg = setup(tmp_path / "run", steps=6, ckpt_every=2)
    monkeypatch.setenv("INFINI_BENCH_FAULT", "between_checkpoint_renames")  # every swap but the first
    monkeypatch.setenv("INFINI_BENCH_FAULT_SIGNAL", "INT")
    with pytest.raises(Interrupted, match=r"the last complete checkpoint, .*last at step 5, is intact"):
        train(model, cfg, stream, run, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "last").exists()  # stopped between the renames
    monkeypatch.delenv("INFINI_BENCH_FAULT")
    model, _, run, _ = setup(tmp_path / "run", steps=6, ckpt_every=2)
    trained = []
    train(model, cfg, lambda i: trained.append(i) or stream(i), run, tmp_path / "ckpt")
    assert trained == [5] and steps_logged(run) == [1, 2, 3, 4, 5, 6]  # step 6 only, each step logged once


def test_a_rerun_after_a_crash_before_results_logs_no_row_twice(tmp_path):
    args = ["task=lm", "trainer.steps=0", "task.seq_len=64", "task.eval_max_docs=1", "task.eval_max_tokens=64",
            "trainer.progress=false", "logger=none"]
    assert cli(*args, out=tmp_path).returncode == 0
    rows = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "results.json").unlink()  # as if killed after the last rows were logged, before results.json
    assert cli(*args, out=tmp_path).returncode == 0
    assert (tmp_path / "metrics.jsonl").read_text() == rows


@pytest.mark.parametrize("error, start", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "trainer.batch_size: out of memory"),
    (KeyboardInterrupt(), "interrupted; rerun the same command"),
    (ConfigError("trainer.lr", "'abc' must be a positive number"), "trainer.lr: 'abc'"),
])
def test_errors_a_user_can_act_on_get_one_line(error, start, tmp_path):
    sys.path.insert(0, str(ROOT))
    from run import error_line

    line, code = error_line(error, tmp_path)
    assert line.startswith(start) and "\n" not in line and code in (1, 2, 130)
    assert error_line(RuntimeError("a bug"), tmp_path) is None  # a bug keeps its traceback


@pytest.mark.parametrize("point", ["export", "final_evaluation"])
def test_sigterm_after_training_says_how_to_resume(tmp_path, point):
    """Preempted after training (exporting the weights, or in the final evaluation), before results.json: one
    line and exit 143, nothing half-written; the rerun finds the finished checkpoint, trains nothing and writes
    the results."""
    args = ["task=lm", "trainer.steps=2", "task.seq_len=64", "task.eval_max_docs=1", "task.eval_max_tokens=64",
            "trainer.progress=false", "logger=none"]
    env = {**ENV, "INFINI_BENCH_FAULT": point, "INFINI_BENCH_FAULT_SIGNAL": "TERM"}
    proc = cli(*args, out=tmp_path / "run", env=env)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: terminated (SIGTERM) outside training")
    assert not (tmp_path / "run" / "results.json").exists()
    again = cli(*args, out=tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert results["train/steps"] == 2

"""Runs that never lose work: each test injects a fault (a kill at a chosen point, a corrupt file, a crafted
pickle, a signal, a bad value) and checks that the run recovers or stops with one clear line."""
import hashlib
import json
import os
import pickle
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
from infini_bench.tracking import Run, read_metrics, write_json
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


# 8. Every trainer value is checked.
@pytest.mark.parametrize("key, value", [("grad_clip", 0), ("warmup_steps", -5), ("lr", float("nan")),
                                        ("gate_lr", float("inf")), ("batch_size", 2.5), ("min_lr_ratio", 2.0),
                                        ("weight_decay", -0.1), ("betas", (0.9, 1.0)), ("seed", -1)])
def test_bad_trainer_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^trainer\.{key}: "):
        TrainConfig(**{key: value})


# 9. Checksums: a checkpoint with zeroed bytes is refused.
def test_checkpoint_with_zeroed_bytes_is_refused(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "last" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    shard.write_bytes(bytes(data))
    model, stream, run, cfg = setup(tmp_path, steps=3)
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .*__0_0\.distcp does not match its recorded checksum; "
                                          r"trainer\.resume=false starts over$"):
        train(model, cfg, stream, run, tmp_path / "ckpt")


# 10. A crafted .metadata (its checksum recorded too) never runs.
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_crafted_checkpoint_metadata_is_refused_and_runs_nothing(tmp_path):
    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    last, marker = tmp_path / "ckpt" / "last", tmp_path / "marker"
    (last / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    manifest = last / "checksums.json"  # the attacker records the crafted file's checksum too
    if manifest.exists():
        sums = json.loads(manifest.read_text())
        sums[".metadata"] = hashlib.sha256((last / ".metadata").read_bytes()).hexdigest()
        manifest.write_text(json.dumps(sums))
    assert "builtins.exec" in _resume_refusal(tmp_path, marker)


def _resume_refusal(tmp_path, marker: Path) -> str:
    """Resume from the tampered checkpoint in tmp_path/ckpt: the one-line refusal, with nothing run."""
    model, stream, run, cfg = setup(tmp_path, steps=3)
    with pytest.raises(ConfigError) as err:
        train(model, cfg, stream, run, tmp_path / "ckpt")
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.resume: ")
    return message


def test_crafted_optimizer_state_in_the_shards_is_refused_and_runs_nothing(tmp_path):
    """The shards' non-tensor entries (the optimizer's lr, betas, group names) are pickles too: one that names
    a callable, re-saved with dcp.save and every checksum rewritten, is refused with one line on resume."""
    import torch.distributed.checkpoint as dcp

    from infini_bench.checkpoint import MANIFEST, _single_process_ok, _state
    from infini_bench.train import make_optimizer

    model, stream, run, cfg = setup(tmp_path, steps=2)
    train(model, cfg, stream, run, tmp_path / "ckpt")
    last, marker = tmp_path / "ckpt" / "last", tmp_path / "marker"
    optimizer = make_optimizer(model, cfg)
    optimizer.param_groups[0]["name"] = _Payload(marker)
    state = _state(model, optimizer)
    for path in last.glob("*.distcp"):
        path.unlink()
    (last / ".metadata").unlink()
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(last), no_dist=True)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in last.iterdir()
            if p.is_file() and p.name != MANIFEST}
    (last / MANIFEST).write_text(json.dumps(sums))  # the attacker records every new checksum
    assert "not plain data" in _resume_refusal(tmp_path, marker)


# Clear errors: SIGINT saves the steps done, then stops with one line; output files follow the umask.
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


def test_output_files_follow_the_umask(tmp_path):
    """results.json, every PNG and the exported weights: 0644 under umask 022, 0600 under 077."""
    from types import SimpleNamespace

    from infini_bench.plots import line_plot
    from tasks.common import export_weights

    model = build_model("tiny", n_layers=1)
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / oct(mask)
        old = os.umask(mask)
        try:
            write_json(out / "results.json", {"a": 1})
            line_plot({"a": [1.0, 2.0]}, out / "plot.png", "x", "y", "t")
            export_weights(model, SimpleNamespace(out_dir=out, is_main=True))
        finally:
            os.umask(old)
        for name in ("results.json", "plot.png", "model.safetensors"):
            assert (out / name).stat().st_mode & 0o777 == mode, (name, oct(mask))


def test_a_corrupt_token_record_names_trainer_resume(tmp_path):
    from hydra import compose, initialize_config_dir

    from infini_bench.token_cache import TokenCache
    from tasks.lm import prepared_stream

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=lm"])
    record = tmp_path / "run" / "train_tokens.json"
    record.parent.mkdir()
    record.write_text('{"recipe": {"mix": ')  # torn
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .*train_tokens\.json is corrupt .*trainer\.resume=false"):
        prepared_stream(cfg.task, {"embedded_pg19": 1.0}, 0, ByteTokenizer(), 2, 0, TokenCache(tmp_path / "cache"),
                        record, fresh=False)


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



def test_lm_runs_keep_one_copy_of_their_tokens_in_the_shared_cache(tmp_path):
    """Two runs of the same data and tokenizer: one cache entry, written once; each run folder keeps only the
    record naming it."""
    env = {**ENV, "INFINI_BENCH_CACHE": str(tmp_path / "cache")}
    assert cli(*TINY_LM, out=tmp_path / "a", env=env).returncode == 0
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    written = entry.stat().st_mtime_ns
    proc = cli(*TINY_LM, "memory=none", out=tmp_path / "b", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "cache" / "tokens").iterdir()) == [entry] and entry.stat().st_mtime_ns == written
    for run in "ab":
        assert not (tmp_path / run / "train_tokens.pt").exists()
        record = json.loads((tmp_path / run / "train_tokens.json").read_text())
        assert record["streams"]["embedded_pg19"]["file"] == str(entry)
    assert "read from the token cache" in (tmp_path / "b" / "run.log").read_text()


def test_a_full_disk_while_caching_the_tokens_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    import tasks.lm as lm
    from infini_bench.errors import ResourceError
    from infini_bench.token_cache import TokenCache

    def full_disk(obj, path):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0: No space left")

    monkeypatch.setattr(torch, "save", full_disk)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=lm", "task.seq_len=64"])
    cache, record = TokenCache(tmp_path / "cache"), tmp_path / "run" / "train_tokens.json"
    with pytest.raises(ResourceError, match=r"cache/embedded_pg19-\w+\.pt could not be written .*No space left.*"
                                            r"free disk space there or point cache_dir at another folder"):
        lm.prepared_stream(cfg.task, {"embedded_pg19": 1.0}, 0, ByteTokenizer(), 2, 0, cache, record, fresh=True)
    assert list(cache.root.iterdir()) == []  # neither the entry nor its temporary file
    assert not record.exists()  # and no record naming an entry that is not there


def test_results_say_which_code_versions_and_device_made_them(tmp_path, monkeypatch):
    from infini_bench import tracking

    Run(tmp_path / "here", {}, device="cpu").finish({"val/ppl": 2.0})
    env = json.loads((tmp_path / "here" / "results.json").read_text())["environment"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True,
                          text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert env["torch"] == torch.__version__ and env["device"] and env["finished_utc"].endswith("Z")
    assert isinstance(env["git_dirty"], bool) or env["git_commit"] is None
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    Run(tmp_path / "nogit", {}, device="cpu").finish({})  # no git on the machine: recorded as unknown
    env = json.loads((tmp_path / "nogit" / "results.json").read_text())["environment"]
    assert env["git_commit"] is None and env["git_dirty"] is None

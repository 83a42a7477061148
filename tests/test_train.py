"""The trainer: exact resume after a kill, NaN guard, the gate's optimizer group."""
import math

import pytest
import torch

from infini_bench.data import TokenStream, embedded_documents
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.tracking import Run, read_metrics
from infini_bench.train import TrainConfig, TrainingDiverged, lr_factor, make_optimizer, train


def setup(tmp_path, name):
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, n_layers=1)
    docs = embedded_documents("embedded_pg19", "validation")
    stream = TokenStream(docs, ByteTokenizer(), seq_len=48, batch_size=2, seed=0)
    run = Run(tmp_path / name, {}, device="cpu")
    cfg = TrainConfig(steps=8, batch_size=2, warmup_steps=2, ckpt_every=3, log_every=1, eval_every=100,
                      progress=False)
    return model, stream, run, cfg


def losses(run):
    return [r["train/loss"] for r in read_metrics(run.metrics_path) if "train/loss" in r]


class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_losses(tmp_path):
    model, stream, run, cfg = setup(tmp_path, "straight")
    train(model, cfg, stream, run, tmp_path / "straight" / "ckpt")
    straight = losses(run)

    model, stream, run, cfg = setup(tmp_path, "killed")

    def dies_at_7(i):
        if i == 7:
            raise Killed
        return stream(i)

    with pytest.raises(Killed):
        train(model, cfg, dies_at_7, run, tmp_path / "killed" / "ckpt")
    assert len(losses(run)) == 7  # steps 1..7 logged, the checkpoint is from step 6
    model, stream, run, cfg = setup(tmp_path, "killed")  # a fresh process: new model, same command
    train(model, cfg, stream, run, tmp_path / "killed" / "ckpt")
    resumed = losses(run)
    assert len(resumed) == 8
    assert resumed == straight  # bit-identical, including the steps replayed after the checkpoint


def test_nan_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    model, stream, run, cfg = setup(tmp_path, "nan")

    def poisoned(i):
        batch = stream(i)
        if i == 4:
            with torch.no_grad():
                model.embed.weight[batch["input_ids"][0, 0]] = float("nan")
        return batch

    with pytest.raises(TrainingDiverged, match=r"train/loss is nan at step 5; .*last good checkpoint"):
        train(model, cfg, poisoned, run, tmp_path / "nan" / "ckpt")
    from infini_bench.checkpoint import Checkpointer

    fresh = build_model("tiny", segment_len=16, n_layers=1)
    assert Checkpointer(tmp_path / "nan" / "ckpt").load(fresh)["step"] == 3
    assert all(torch.isfinite(v).all() for v in fresh.state_dict().values())


def test_gate_has_own_lr_and_no_weight_decay():
    model = build_model("tiny")
    opt = make_optimizer(model, TrainConfig(lr=1e-3, gate_lr=5e-2, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    gate_ids = {id(layer.attn.gate) for layer in model.layers}
    assert {id(p) for p in groups["gate"]["params"]} == gate_ids
    assert groups["gate"]["lr"] == 5e-2 and groups["gate"]["weight_decay"] == 0.0
    assert all(id(p) not in gate_ids for p in groups["decay"]["params"])


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_token_stream_is_a_pure_function_of_the_index():
    docs = embedded_documents("embedded_pg19", "validation")
    a = TokenStream(docs, ByteTokenizer(), 32, 2, seed=1)
    b = TokenStream(docs, ByteTokenizer(), 32, 2, seed=1)
    assert torch.equal(a(5)["input_ids"], b(5)["input_ids"])
    assert not torch.equal(a(5)["input_ids"], a(6)["input_ids"])
    assert torch.equal(a(5)["input_ids"][:, 1:], a(5)["labels"][:, :-1])  # labels are the next tokens


def test_time_budget_decays_over_the_budget_and_stops_there():
    cfg = TrainConfig(steps=10_000, warmup_steps=2, min_lr_ratio=0.1, time_budget_s=100.0)
    assert lr_factor(5, cfg, seconds=0.0) == pytest.approx(1.0)
    assert lr_factor(5, cfg, seconds=50.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(5, cfg, seconds=150.0) == pytest.approx(0.1)
    with pytest.raises(Exception, match="trainer.time_budget_s"):
        TrainConfig(time_budget_s=0)


def test_time_budget_ends_training_and_a_resume_keeps_the_seconds(tmp_path, monkeypatch):
    """Every step takes 10 fake seconds: a 35 s budget stops after the 4th step (40 s >= 35 s), saves a
    checkpoint there, and a rerun of the same command finds the budget spent and trains no further."""
    import infini_bench.train as train_module

    clock = iter(range(0, 10_000, 10))  # a step reads the clock at its start and end: 10 s per step
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(clock)))
    model, stream, run, cfg = setup(tmp_path, "budget")
    cfg.time_budget_s, cfg.log_every = 35.0, 100
    summary = train(model, cfg, stream, run, tmp_path / "budget" / "ckpt")
    assert summary["train/steps"] == 4 and summary["train/seconds"] >= 35.0
    assert len(losses(run)) == 1  # the last step is logged although log_every is not reached
    model, stream, run, cfg = setup(tmp_path, "budget")
    cfg.time_budget_s = 35.0
    again = train(model, cfg, stream, run, tmp_path / "budget" / "ckpt")
    assert again["train/steps"] == 4 and again["train/seconds"] == summary["train/seconds"]


def test_metrics_rows_of_one_step_never_repeat_a_metric(tmp_path):
    """What the README promises of metrics.jsonl: an evaluating step has a training row, an evaluation row and
    a gates row, and no key is logged twice for a step."""
    model, stream, run, cfg = setup(tmp_path, "rows")
    cfg.eval_every, cfg.log_every = 4, 2

    def evaluate(m, step):
        run.log({f"gates/L0/H{j}": float(g) for j, g in enumerate(m.gates()[0])}, step=step)
        return {"val/loss": 1.0}

    train(model, cfg, stream, run, tmp_path / "rows" / "ckpt", eval_fn=evaluate)
    by_step: dict[int, list[set]] = {}
    for row in read_metrics(run.metrics_path):
        by_step.setdefault(row["step"], []).append(set(row) - {"step"})
    assert len(by_step[4]) == 3  # step 4: training, gates, evaluation
    for step, rows in by_step.items():
        keys = [k for r in rows for k in r]
        assert len(keys) == len(set(keys)), step


def test_a_run_without_a_progress_bar_logs_a_heartbeat_every_two_minutes(tmp_path, monkeypatch, caplog):
    """10 fake seconds a step, 30 steps: a line at 120 s (step 12) and 240 s (step 24), and one at the end."""
    import logging

    import infini_bench.train as train_module

    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(clock)))
    model, stream, run, cfg = setup(tmp_path, "quiet")
    cfg.steps, cfg.progress, cfg.log_every, cfg.ckpt_every = 30, False, 100, 100
    with caplog.at_level(logging.INFO, logger="infini_bench.train"):
        train(model, cfg, stream, run, tmp_path / "quiet" / "ckpt")
    beats = [r.getMessage() for r in caplog.records if r.name == "infini_bench.train"]
    assert [b.split()[1] for b in beats] == ["12/30", "24/30", "30/30"]
    tokens = cfg.batch_size * cfg.grad_accum * stream.seq_len
    assert beats[0].endswith(f"{tokens / 10:.0f} tokens/s  ETA 0:03:00")  # 18 steps left at 10 s each
    assert beats[-1].endswith("ETA 0:00:00")


@pytest.mark.parametrize("warmup_steps, same", [(3, True), (0, False)])
def test_extending_a_run_equals_a_straight_run_only_while_their_learning_rates_agree(tmp_path, warmup_steps, same):
    """4 steps, then trainer.steps=8 from the step-4 checkpoint, against 8 steps straight. The schedule is laid
    over the new total, so steps 5-8 have the straight run's rates either way, and the batches are the same.
    Within the lr warm-up (warmup_steps=3: steps 1-4 ramp, then the cosine starts at 1, whatever the total) the
    first 4 steps had the straight run's rates too, and every loss is identical. Without a warm-up, the cosine
    over 4 steps decayed faster: step 2's loss is still the same (one update, at the same rate), later ones
    are not."""
    model, stream, run, cfg = setup(tmp_path, "straight")
    cfg.steps, cfg.warmup_steps = 8, warmup_steps
    train(model, cfg, stream, run, tmp_path / "straight" / "ckpt")
    straight = losses(run)
    model, stream, run, cfg = setup(tmp_path, "extended")
    cfg.steps, cfg.warmup_steps = 4, warmup_steps
    train(model, cfg, stream, run, tmp_path / "extended" / "ckpt")
    model, stream, run, cfg = setup(tmp_path, "extended")  # the rerun with more steps
    cfg.steps, cfg.warmup_steps = 8, warmup_steps
    train(model, cfg, stream, run, tmp_path / "extended" / "ckpt")
    extended = losses(run)
    assert len(extended) == 8
    rates = [r["train/lr"] for r in read_metrics(run.metrics_path) if "train/lr" in r]
    straight_rates = [r["train/lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train/lr" in r]
    assert rates[4:] == straight_rates[4:]
    assert (rates == straight_rates) == same and (extended == straight) == same
    assert extended[:2] == straight[:2]


def test_gates_are_logged_with_each_checkpoint_between_evaluations(tmp_path):
    """A recipe that evaluates once still records how its gates moved: one row per checkpoint, the values the
    model had then; evaluated steps and the last are left to the task, which logs them itself."""
    model, stream, run, cfg = setup(tmp_path, "gates")
    cfg.eval_every = 6
    seen = {}

    def evaluate(m, step):
        seen[step] = m.gates()[0].tolist()
        return {"val/loss": 1.0}

    train(model, cfg, stream, run, tmp_path / "gates" / "ckpt", eval_fn=evaluate)
    rows = {r["step"]: r for r in read_metrics(run.metrics_path) if "gates/L0/H0" in r}
    assert sorted(rows) == [3]  # checkpoints at 3 and 6 (evaluated) and 8 (the last)
    heads = model.cfg.n_heads
    assert len([k for k in rows[3] if k.startswith("gates/")]) == heads
    assert all(0 < rows[3][f"gates/L0/H{j}"] < 1 for j in range(heads))
    assert [rows[3][f"gates/L0/H{j}"] for j in range(heads)] != seen[6]  # logged at step 3, not later values

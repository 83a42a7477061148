"""The runner with a task of the test's own, registered like the shipped ones: it is trained, exported, evaluated
and logged through tasks.runner alone, so any new task module gets the same sequence."""
import errno
import json
import os
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tasks
import tasks.runner as runner
from infini_bench.checkpoint import Checkpointer
from infini_bench.errors import ConfigError
from infini_bench.tracking import Run
from infini_bench.train import lm_loss
from tasks.runner import Phase, Task, run_task

CONF = str(Path(__file__).resolve().parents[1] / "conf")


class Fake(Task):
    """Random tokens in, the mean loss on one fixed batch out; records which hooks ran, in order."""

    calls: list[str] = []

    def check(self) -> None:
        self.calls.append("check")
        if self.t.bad:
            raise ConfigError("task.bad", "is set")

    def load(self) -> None:
        self.calls.append("load")

    def batches(self):
        def batch(index: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(index))
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        return batch

    def phases(self) -> Iterator[Phase]:
        for name in ("first", "second")[: self.t.phases]:
            self.calls.append(f"phase {name}")
            where = Checkpointer.of_run(self.run.out_dir, *(() if name == "second" else (name,)))
            yield Phase(self.model, self.tcfg, self.batches(), self.run, where, validate=name == "second")

    def validate(self, model) -> dict[str, float]:
        self.calls.append("validate")
        return {"val/fake": self._loss(model)}

    def _loss(self, model) -> float:
        batch = self.batches()(10**6)
        with torch.no_grad():
            return float(lm_loss(model, batch["input_ids"], batch["labels"]))

    def evaluate(self, model, summary: dict) -> dict:
        self.calls.append("evaluate")
        return {"val/score": self._loss(model), "train/steps": self.tcfg.steps, "train/loss": summary.get("train/loss"),
                "val/rows": [1, 2]}

    def artefacts(self, results: dict) -> None:
        rows = [json.loads(line) for line in (Path(self.run.out_dir) / "metrics.jsonl").read_text().splitlines()]
        self.calls.append(f"artefacts after {sorted(k for k in rows[-2] if k.startswith('val/'))}")


@pytest.fixture
def fake(monkeypatch):
    """The fake task registered as `fake`: tasks.get_task finds it as it finds lm, passkey and booksum."""
    module = types.ModuleType("tasks.fake")
    module.TASK = Fake
    monkeypatch.setitem(sys.modules, "tasks.fake", module)
    monkeypatch.setattr(tasks, "TASKS", (*tasks.TASKS, "fake"))
    Fake.calls = []
    return Fake


def config(*overrides: str, phases: int = 2, bad: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["task=lm", "logger=none", "memory=linear", "trainer.progress=false",
                                           "trainer.batch_size=2", *overrides])
    cfg.task = OmegaConf.create({"name": "fake", "phases": phases, "bad": bad})
    return cfg


def test_a_registered_task_is_trained_exported_evaluated_and_logged(fake, tmp_path):
    run = Run(tmp_path, {}, device="cpu")
    results = run_task(config("trainer.steps=2", "trainer.eval_every=1"), run)
    # The trainer validates before the last step only: the final evaluation covers the end.
    assert fake.calls == ["check", "load", "phase first", "phase second", "validate", "evaluate",
                          "artefacts after ['val/score']"]
    assert (tmp_path / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val/score" in r]
    assert len(final) == 1 and final[0]["step"] == 2 and "val/rows" not in final[0]  # numbers only
    assert final[0]["val/score"] == results["val/score"]
    gate_steps = [r["step"] for r in rows if any(k.startswith("gates/") for k in r)]
    assert gate_steps == [1, 2]  # with the validation of the second phase, then with the final results
    assert [r["step"] for r in rows if "val/fake" in r] == [1]


def test_results_json_is_written_whole_or_not_at_all(fake, tmp_path, monkeypatch):
    run = Run(tmp_path, {}, device="cpu")
    run.finish(run_task(config("trainer.steps=1"), run))
    before = (tmp_path / "results.json").read_text()
    assert json.loads(before)["results"]["val/rows"] == [1, 2]

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    again = Run(tmp_path, {}, device="cpu")
    results = run_task(config("trainer.steps=1", phases=1), again)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        again.finish(results)
    assert (tmp_path / "results.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_evaluation_only_trains_nothing_and_exports_nothing(fake, tmp_path):
    results = run_task(config("trainer.steps=0", phases=1), Run(tmp_path, {}, device="cpu"))
    assert not (tmp_path / "model.safetensors").exists()
    assert results["train/steps"] == 0 and "evaluate" in fake.calls


def test_a_bad_value_stops_before_the_model_is_built(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "build_model_and_tokenizer", lambda cfg: pytest.fail("built the model"))
    with pytest.raises(ConfigError, match="^task.bad: is set"):
        run_task(config("trainer.steps=1", bad=True), Run(tmp_path, {}, device="cpu"))
    assert fake.calls == ["check"]

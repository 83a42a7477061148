"""One runner for every task: build, train, export, evaluate, log. A task supplies only what is its own (its
checks, data, training phases, evaluation and artefacts) by subclassing `Task`, as lm-evaluation-harness's tasks
do; the sequence they fill in is written once, here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omegaconf import DictConfig

from infini_bench.checkpoint import Checkpointer
from infini_bench.faults import fault
from infini_bench.model import SegmentTransformer
from infini_bench.tracking import Run
from infini_bench.train import TrainConfig, train
from tasks import get_task
from tasks.common import build_model_and_tokenizer, export_weights, log_gates, log_setting, train_config


@dataclass
class Phase:
    """One call of the trainer: the model it trains, its config, micro-batches, where it logs and checkpoints,
    and whether the task's `validate` runs during it."""

    model: SegmentTransformer
    tcfg: TrainConfig
    batches: Callable[[int], dict]
    run: Any  # the Run, or a view of it that logs its steps after an earlier phase's
    checkpointer: Checkpointer
    validate: bool = True


class Task:
    """What a benchmark supplies to the runner. One instance per run: the hooks share what they built on it
    (`self.model`, `self.tokenizer`, `self.tcfg` are set by the runner as it goes)."""

    model: SegmentTransformer
    tokenizer: Any
    tcfg: TrainConfig

    def __init__(self, cfg: DictConfig, run: Run):
        self.cfg, self.t, self.run = cfg, cfg.task, run

    @staticmethod
    def check_values(cfg: DictConfig) -> None:
        """The task values that need no data to judge; run.py calls it before W&B starts a run."""

    def check(self) -> None:
        """Checks before the run's setting line is logged."""

    def load(self) -> None:
        """Data that needs no model, read before one is built (lm: a hub data set that can't be reached stops
        the run before a tokenizer or checkpoint is looked for)."""

    def setup(self) -> TrainConfig:
        """Checks that need the tokenizer, the training data, and the trainer's config."""
        return train_config(self.cfg)

    def phases(self) -> Iterator[Phase]:
        """The training phases, in order; each is trained before the next is asked for. Default: one phase on
        `batches()`, in the run's checkpoint folder."""
        yield Phase(self.model, self.tcfg, self.batches(), self.run, Checkpointer.of_run(self.run.out_dir))

    def batches(self) -> Callable[[int], dict]:
        """Micro-batch i of the main phase's training data."""
        raise NotImplementedError

    def validate(self, model: SegmentTransformer) -> dict[str, float]:
        """The evaluation during training, every trainer.eval_every steps."""
        return {}

    def evaluate(self, model: SegmentTransformer, summary: dict) -> dict:
        """The final evaluation as results.json's `split/metric` results; `summary` is the trainer's (train/loss,
        train/steps) of the last phase, empty when none trained."""
        raise NotImplementedError

    @property
    def final_step(self) -> int:
        """The step the final results, gates and artefacts are logged at."""
        return self.tcfg.steps

    def artefacts(self, results: dict) -> None:
        """Plots, tables and files of the final evaluation, logged after its results and gates."""


def run_task(cfg: DictConfig, run: Run) -> dict:
    """Run cfg.task's benchmark: checks, data, model, training phases, export, final evaluation, its results
    logged at the final step with the gates, and its artefacts. Returns the results for results.json."""
    task: Task = get_task(cfg.task.name)(cfg, run)
    task.check()
    log_setting(cfg)
    task.load()
    task.model, task.tokenizer = build_model_and_tokenizer(cfg)
    task.tcfg = task.setup()
    summary: dict = {}
    trained = False
    for phase in task.phases():
        summary = train(phase.model, phase.tcfg, phase.batches, phase.run, phase.checkpointer,
                        eval_fn=_validate(task, phase.run) if phase.validate else None)
        trained = trained or phase.tcfg.steps > 0
    if trained:
        export_weights(task.model, run)  # for model.init_from: e.g. continual pre-training, then passkey
    fault("final_evaluation")
    results = task.evaluate(task.model, summary)
    step = task.final_step
    run.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=step)
    log_gates(task.model, run, step)
    task.artefacts(results)
    return results


def _validate(task: Task, run) -> Callable[[SegmentTransformer, int], dict[str, float]]:
    """The trainer's eval_fn: the task's evaluation during training, with the gates at that step."""

    def evaluate(model: SegmentTransformer, step: int) -> dict[str, float]:
        metrics = task.validate(model)
        log_gates(model, run, step)
        return metrics

    return evaluate

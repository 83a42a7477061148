"""One runner for every task: build, train, export, evaluate, log. A task supplies only what is its own (its
checks, data, training phases, evaluation and artefacts) by subclassing `Task`, as lm-evaluation-harness's tasks
do; the sequence they fill in is written once, here, with what turns the composed config into the library's
objects (the model, its tokenizer, the trainer's config), so that a reader follows the config through one file."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from infini_bench.checkpoint import Checkpointer
from infini_bench.distributed import is_main_process
from infini_bench.errors import ConfigError, check_choice, check_finite
from infini_bench.faults import fault
from infini_bench.model import SegmentTransformer
from infini_bench.model_config import FLAVOURS, ModelConfig
from infini_bench.tokenizer import load_tokenizer
from infini_bench.tracking import Run
from infini_bench.train import TrainConfig, train
from tasks import get_task
from tasks.common import export_weights, load_weights, log_gates

log = logging.getLogger(__name__)
_MODEL_KNOBS = ("segment_len", "gate_init", "activation_checkpointing")
_TRAINER_SHOWN = ("steps", "batch_size", "grad_accum", "optimizer", "lr", "gate_lr", "warmup_steps", "precision")
_SCALED = Path(__file__).resolve().parents[1] / "conf" / "task" / "scale"  # <task>_<scale>.yaml: what a scale sets


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
    (`self.model`, `self.tokenizer`, `self.tcfg`, `self.summary` are set by the runner as it goes)."""

    model: SegmentTransformer
    tokenizer: Any
    tcfg: TrainConfig
    summary: dict  # the trainer's summary of the last phase (train/loss, train/steps, ...): empty until trained

    def __init__(self, cfg: DictConfig, run: Run):
        self.cfg, self.t, self.run = cfg, cfg.task, run
        self.summary = {}

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
        """The step the final results, gates and artefacts are logged at: the last step trained (fewer than
        trainer.steps when trainer.time_budget_s ends training first)."""
        return int(self.summary.get("train/steps", self.tcfg.steps))

    def artefacts(self, results: dict) -> None:
        """Plots, tables and files of the final evaluation, logged after its results and gates."""


def check_run(cfg: DictConfig) -> TrainConfig:
    """Every value a run can be judged on before it starts (task.limit, the trainer's options, the task's own
    values): run.py calls it before W&B starts a run, so a job that can't run stops with one line."""
    check_limit(cfg.task)
    tcfg = train_config(cfg)
    get_task(cfg.task.name).check_values(cfg)
    return tcfg


def run_task(cfg: DictConfig, run: Run) -> dict:
    """Run cfg.task's benchmark: checks, data, model, training phases, export, final evaluation, its results
    logged at the final step with the gates, and its artefacts. Returns the results for results.json."""
    task: Task = get_task(cfg.task.name)(cfg, run)
    task.check()
    log_setting(cfg)
    task.load()
    task.model, task.tokenizer = build_model_and_tokenizer(cfg)
    task.tcfg = task.setup()
    trained = False
    for phase in task.phases():
        task.summary = train(phase.model, phase.tcfg, phase.batches, phase.run, phase.checkpointer,
                             eval_fn=_validate(task, phase.run) if phase.validate else None)
        trained = trained or phase.tcfg.steps > 0
    if trained:
        export_weights(task.model, run)  # for model.init_from: e.g. continual pre-training, then passkey
    fault("final_evaluation")
    results = task.evaluate(task.model, task.summary)
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


# ----------------------------------------------------------------------------------------------------------------------


def memory_fields(cfg: DictConfig) -> dict:
    """ModelConfig's memory and memory_args from the memory config group (its name and its parameters)."""
    args = {k: v for k, v in OmegaConf.to_container(cfg.memory, resolve=True).items() if k != "name"}
    return {"memory": cfg.memory.name, "memory_args": args or None}


def model_config(cfg: DictConfig, vocab_size: int | None = None) -> ModelConfig:
    """The flavour's architecture with the run-time knobs, memory and model.arch applied."""
    check_choice("model.flavour", cfg.model.flavour, list(FLAVOURS))
    base = FLAVOURS[cfg.model.flavour]
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True) if cfg.model.get("arch") else {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise ConfigError(f"model.arch.{unknown[0]}", f"is not a model field; accepted: {', '.join(sorted(fields))}")
    knobs = {k: cfg.model[k] for k in _MODEL_KNOBS if cfg.model.get(k) is not None}
    if "gate_init" in knobs:
        check_finite("model.gate_init", knobs["gate_init"])
    out = dataclasses.replace(base, **arch, **knobs, **memory_fields(cfg))
    if vocab_size is not None and vocab_size > out.vocab_size:
        if cfg.model.flavour == "tiny":  # the tiny flavour follows its tokenizer
            out = dataclasses.replace(out, vocab_size=vocab_size)
        else:
            raise ConfigError("model.tokenizer", f"{cfg.model.tokenizer!r} has {vocab_size} tokens, more than "
                              f"model.flavour={cfg.model.flavour!r}'s vocab_size {out.vocab_size}")
    return out


def setting_line(cfg: DictConfig) -> str:
    """The task's scale and the values it runs with, task.* and trainer.* overrides included."""
    path = _SCALED / f"{cfg.task.name}_{cfg.scale}.yaml"
    task = ", ".join(f"{k}={_plain(cfg.task[k])}" for k in (OmegaConf.load(path) if path.exists() else ()))
    trainer = ", ".join(f"{k}={_plain(cfg.trainer[k])}" for k in _TRAINER_SHOWN)
    if cfg.trainer.steps == 0:
        trainer = "steps=0, evaluation only (no training data is built)"
    return (f"task={cfg.task.name} at scale={cfg.scale} (model={cfg.model.name}): {task}; "
            f"trainer: {trainer}")


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def log_setting(cfg: DictConfig) -> None:
    """The line every task starts with: its scale and the values it runs with (rank 0 alone, under torchrun)."""
    if cfg.get("scale") is not None and is_main_process():
        log.info(setting_line(cfg))


def build_model_and_tokenizer(cfg: DictConfig) -> tuple[SegmentTransformer, object]:
    """A pretrained checkpoint converted to Infini-attention, or a random model of the named flavour; then,
    with model.init_from, the weights an earlier run exported (e.g. continual pre-training, then passkey)."""
    if cfg.model.get("pretrained"):
        from infini_bench.pretrained import load_pretrained

        model, tokenizer = load_pretrained(cfg.model.pretrained, segment_len=cfg.model.segment_len,
                                           **memory_fields(cfg), gate_init=cfg.model.gate_init)
    else:
        model, tokenizer = _random_model(cfg)
    if cfg.model.get("init_from"):
        load_weights(model, cfg.model.init_from)
    return model, tokenizer


def _random_model(cfg: DictConfig) -> tuple[SegmentTransformer, object]:
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError("model.tokenizer", f"{cfg.model.tokenizer!r} could not be loaded "
                          f"({str(err).splitlines()[0][:120]}); use byte or a local tokenizer directory") from None
    torch.manual_seed(cfg.seed)
    return SegmentTransformer(model_config(cfg, tokenizer.vocab_size)), tokenizer


def train_config(cfg: DictConfig, **overrides) -> TrainConfig:
    """The TrainConfig of cfg.trainer, with overrides on top."""
    values = OmegaConf.to_container(cfg.trainer, resolve=True)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}", f"is not a trainer option; accepted: {', '.join(sorted(fields))}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**{**values, **overrides})


# Each task's own count of evaluation items, which task.limit caps.
EVAL_COUNT = {"lm": "eval_max_docs", "passkey": "samples", "booksum": "eval_books", "recall": "samples"}


def check_limit(t: DictConfig) -> None:
    limit = t.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError("task.limit", f"{limit!r} must be null (task.{EVAL_COUNT[t.name]}) or an integer >= 1")


def eval_count(t: DictConfig) -> int:
    """How many evaluation items the task runs (lm: documents, passkey: samples per length and depth, booksum:
    books): its own setting, capped by task.limit when that is set, like lm-eval's --limit for a quick check."""
    check_limit(t)
    own = t[EVAL_COUNT[t.name]]
    return own if t.get("limit") is None else min(own, t.limit)

"""The thin layer between Hydra configs and the library: build models, tokenizers and trainer configs."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from infini_bench.distributed import is_main_process
from infini_bench.errors import ConfigError, check_choice, check_finite
from infini_bench.faults import fault
from infini_bench.model import SegmentTransformer
from infini_bench.model_config import FLAVOURS, ModelConfig
from infini_bench.tokenizer import load_tokenizer
from infini_bench.files import follow_umask
from infini_bench.train import TrainConfig, gate_metrics, gate_values

log = logging.getLogger(__name__)
_MODEL_KNOBS = ("segment_len", "gate_init", "activation_checkpointing")
_TRAINER_SHOWN = ("steps", "batch_size", "grad_accum", "optimizer", "lr", "gate_lr", "warmup_steps", "precision")
_SCALED = Path(__file__).resolve().parents[1] / "conf" / "task" / "scale"  # <task>_<scale>.yaml: what a scale sets


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


def load_weights(model: SegmentTransformer, path: str) -> None:
    """Weights from the model.safetensors an earlier run exported (a path, or relative to the repository)."""
    from safetensors.torch import load_model

    found = Path(path).expanduser()
    if not found.exists() and not found.is_absolute():
        found = Path(__file__).resolve().parents[1] / path
    if not found.is_file():
        raise ConfigError("model.init_from", f"{path!r} is not a file; null starts from model.pretrained or random")
    from safetensors import SafetensorError

    try:
        load_model(model, str(found), device=str(model.embed.weight.device))
    except (RuntimeError, KeyError, SafetensorError) as err:  # not safetensors, or another model's
        raise ConfigError("model.init_from", f"{path!r} does not fit this model "
                          f"({str(err).splitlines()[0][:160]})") from None


def export_weights(model: SegmentTransformer, run) -> Path:
    """The trained weights as <run>/model.safetensors (fp32, gathered from every rank under FSDP), written
    atomically by rank 0, for model.init_from. A collective under torchrun: every rank calls it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    fault("export")
    path = Path(run.out_dir) / "model.safetensors"
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.is_main:
        if model.lm_head.weight is model.embed.weight:  # tied: one tensor, stored once
            state.pop("lm_head.weight", None)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        follow_umask(tmp)
        os.replace(tmp, path)
    return path


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


def no_batches(index: int) -> dict[str, torch.Tensor]:
    """The batch_fn of a run that trains no step (trainer.steps=0, evaluation only): it builds no training data."""
    raise RuntimeError(f"micro-batch {index} asked for in a run without training steps")


def footprint_results(model_cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """The memory carried between segments at seq_len tokens (Table 1), three ways, for results.json."""
    fp = model_cfg.footprint(seq_len)
    return {"footprint/paper_floats": fp.paper_floats, "footprint/state_floats": fp.state_floats,
            "footprint/state_bytes": fp.state_bytes, "footprint/seq_len": seq_len}


def log_gates(model: SegmentTransformer, run, step: int | None) -> dict[str, float]:
    """sigmoid(beta) per layer and head (paper Figure 3): one number per head in metrics.jsonl (`gates/L0/H3`, which
    the report reads), and in W&B one table of (layer, head, gate) and a heatmap image per evaluation, not a panel
    per head (1,024 for the 8B)."""
    from infini_bench.plots import gate_heatmap

    layers, gates = gate_values(model)
    if not layers:  # no memory mixed in by a gate (none, full, txl, rmt)
        return {}
    metrics = gate_metrics(layers, gates)
    run.log(metrics, step=step, to_wandb=False)
    run.log_table("gates/values", ["layer", "head", "gate"],
                  [[i, j, float(g)] for i, row in zip(layers, gates) for j, g in enumerate(row)], step=step, save=False)
    if run.is_main:
        title = f"{run.config.get('name', '')}: sigmoid(beta) per layer and head".lstrip(": ")
        if step is not None:
            title += f", step {step}"
        run.log_image("gates/heatmap", gate_heatmap(gates, Path(run.out_dir) / "gates.png", title, layers=layers),
                      step=step)
    return metrics

"""What tasks share beyond the runner: weights in and out (model.init_from, model.safetensors), the gates logged
with each evaluation, Table 1's footprint, and the batch function of a run that trains nothing."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from infini_bench.errors import ConfigError
from infini_bench.faults import fault
from infini_bench.files import follow_umask
from infini_bench.model import SegmentTransformer, is_memory_parameter
from infini_bench.model_config import ModelConfig
from infini_bench.train import gate_metrics, gate_values

log = logging.getLogger(__name__)


def load_weights(model: SegmentTransformer, path: str) -> None:
    """Weights from the model.safetensors an earlier run exported (a path, or relative to the repository).

    A run of another memory may start from them: the parameters this memory adds to the decoder (gates, memory
    tokens, ...) keep their initial values when the file lacks them, as with model.pretrained; the file's own
    memory parameters are left out. Every other weight must be in the file, and fit."""
    from safetensors import safe_open

    found = Path(path).expanduser()
    if not found.exists() and not found.is_absolute():
        found = Path(__file__).resolve().parents[1] / path
    if not found.is_file():
        raise ConfigError("model.init_from", f"{path!r} is not a file; null starts from model.pretrained or random")
    from safetensors import SafetensorError

    ours, own = model.state_dict(), {name for name, _ in model.memory_parameters()}
    tied = {"lm_head.weight"} if model.lm_head.weight is model.embed.weight else set()  # export_weights stores it once
    try:
        with safe_open(str(found), framework="pt", device=str(model.embed.weight.device)) as f:
            sd = {name: f.get_tensor(name) for name in f.keys() if name in ours or not is_memory_parameter(name)}
        for what, names in (("lacks", set(ours) - set(sd) - own - tied), ("has unexpected", set(sd) - set(ours))):
            if names:
                raise ValueError(f"it {what} {len(names)} weights, e.g. {sorted(names)[0]!r}")
        model.load_state_dict(sd, strict=False)  # a shape that does not fit fails here
    except (RuntimeError, ValueError, SafetensorError) as err:  # not safetensors, or another model's
        raise ConfigError("model.init_from", f"{path!r} does not fit this model "
                          f"({str(err).splitlines()[0][:160]})") from None
    if own - set(sd):
        log.info("model.init_from: %d memory parameters not in %s keep their initial values", len(own - set(sd)),
                 found.name)


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

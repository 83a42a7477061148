"""The training loop: BPTT through every segment of a sequence, exact resume, NaN guard, periodic eval.

Batches come from `batch_fn(i)`, a pure function of the micro-batch index i, so a resumed run replays
exactly the batches the interrupted one would have seen; with the model, optimizer and scheduler restored
from the checkpoint, the losses after a resume are identical to an uninterrupted run's.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from infini_bench import distributed
from infini_bench.checkpoint import Checkpointer
from infini_bench.errors import ConfigError, check_bool, check_choice, check_int, check_positive, check_range
from infini_bench.tracking import Run

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
_clock = time.perf_counter  # what trainer.time_budget_s counts (a test replaces it)
HEARTBEAT_S = 120.0  # with trainer.progress=false, a line with the step, loss, speed and ETA this often
log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight became NaN or Inf; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint of the steps done so far was saved, or a second
    SIGINT stopped it at once, the last complete checkpoint kept."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    gate_lr: float = 1e-2  # the gate needs a larger step than the rest (docs/PAPER_NOTES.md, pitfall 7)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    eval_every: int = 100
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    resume: bool = True
    progress: bool = True
    compile: bool = False  # torch.compile each block (GPU; 1.5x the eager tokens/s in docs/BENCHMARKS.md)
    # Seconds of training (evaluation and checkpoints not counted) after which the run ends: the cosine decay
    # is laid over the budget instead of `steps`, which becomes a cap. For choosing a shape by what it reaches
    # in a fixed time; the steps then depend on the clock, so a result to compare trains for fixed `steps`.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        check_choice("trainer.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("trainer.schedule", self.schedule, SCHEDULES)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        for key in ("batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every"):
            check_int(f"trainer.{key}", getattr(self, key), low=1)
        for key in ("steps", "warmup_steps", "seed"):
            check_int(f"trainer.{key}", getattr(self, key), low=0)
        for key in ("lr", "gate_lr", "grad_clip"):  # grad_clip=0 would scale every gradient to zero
            check_positive(f"trainer.{key}", getattr(self, key))
        check_range("trainer.weight_decay", self.weight_decay, 0.0, math.inf)
        check_range("trainer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.time_budget_s is not None:
            check_positive("trainer.time_budget_s", self.time_budget_s)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ConfigError("trainer.betas", f"{self.betas!r} must be two numbers in [0, 1)")
        for beta in self.betas:
            check_range("trainer.betas", beta, 0.0, 1.0, high_open=True)
        for key in ("resume", "progress", "compile"):
            check_bool(f"trainer.{key}", getattr(self, key))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Gates get their own learning rate and no weight decay; norms, biases and embeddings no decay either."""
    gates, no_decay, decay = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("attn.gate"):
            gates.append(p)
        elif p.ndim < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
        {"params": gates, "weight_decay": 0.0, "lr": cfg.gate_lr, "name": "gate"},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg) if g["params"]]
    if cfg.optimizer == "adafactor":  # the paper's choice for its LM runs
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def lr_factor(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio (the paper: 1000 warm-up steps, then cosine). Under
    trainer.time_budget_s the decay runs over the budget: its progress is `seconds` trained of the budget."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.time_budget_s is not None:
        progress = seconds / cfg.time_budget_s
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Mean next-token cross-entropy (labels -100 ignored) without ever holding all (B, T, V) logits.

    Only the labelled positions reach the head: a task that scores a few tokens of each sample (recall's values,
    passkey's answer) pays for those, not for every position. The head and the loss run on `chunk_tokens`
    positions at a time under activation checkpointing, so only one chunk of fp32 logits exists at once, in
    forward and in backward. By default a chunk holds 2^28 logits (1 GiB in fp32) and at least 4,096 positions:
    at a 128K vocabulary that is 4,096 positions instead of 16 GB for a whole 32K sequence; at a vocabulary of a
    few thousand, a whole batch in a few chunks rather than hundreds of small ones.
    """
    h, _ = model.hidden(input_ids)  # (B, T, dim)
    h, labels = h.flatten(0, 1), labels.flatten()
    keep = labels != -100
    h, labels = h[keep], labels[keep]
    head = model.lm_head
    if chunk_tokens is None:
        chunk_tokens = max(4096, 2**28 // head.weight.shape[0])

    def chunk_loss(h_c: Tensor, y_c: Tensor) -> Tensor:
        return F.cross_entropy(head(h_c).float(), y_c, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, max(h.shape[0], 1), chunk_tokens):  # one empty chunk when nothing is labelled: the head
        # is still in the graph, so under FSDP every rank's backward reaches the same parameters
        h_c, y_c = h[start: start + chunk_tokens], labels[start: start + chunk_tokens]
        total = total + checkpoint(chunk_loss, h_c, y_c, use_reentrant=False)
    return total / keep.sum().clamp(min=1)


def autocast(device: torch.device, precision: str):
    """Mixed precision for a forward pass: bf16 autocast over fp32 parameters for `precision` bf16, or auto on a GPU;
    otherwise none (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def gate_values(model: nn.Module) -> tuple[list[int], Tensor]:
    """The gated layers and sigmoid(beta) per head of each, (len(layers), H): the paper's Figure 3. No layers
    for a model without gates."""
    layers = model.gate_layers() if hasattr(model, "gate_layers") else []
    # Under FSDP each rank holds a slice of every gate: every rank gathers, the main one logs.
    return layers, distributed.full_tensor(model.gates()) if layers else torch.zeros(0, 0)


def gate_metrics(layers: list[int], gates: Tensor) -> dict[str, float]:
    """`gate_values` as metrics, `gates/L<layer>/H<head>`. The trainer logs them with every checkpoint between
    evaluations (in the training row of a step that logs one), so a run that evaluates once still shows how its
    gates moved."""
    return {f"gates/L{i}/H{j}": float(g) for i, row in zip(layers, gates) for j, g in enumerate(row)}


def _diverged(what: str, ckpt: Checkpointer) -> TrainingDiverged:
    where = f"the last good checkpoint is {ckpt.path}" if ckpt.exists() else "no checkpoint was written yet"
    return TrainingDiverged(f"{what}; stopped, {where}")


def _save(ckpt: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
          run: Run, summary: dict[str, float]) -> None:
    """A checkpoint of `step` (a collective: all ranks call it); a NaN or Inf weight is never saved."""
    named = list(model.named_parameters())
    bad = [name for (name, _), ok in zip(named, distributed.all_finite([p for _, p in named])) if not ok]
    if bad:
        raise _diverged(f"{bad[0]} is not finite after step {step}", ckpt)
    ckpt.save(model, optimizer, step, asdict(cfg), summary, run)


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Catch SIGINT and SIGTERM while training (the main thread only): the list gets the signal, and the loop
    saves a checkpoint at the end of the step before it stops. Preemption loses no finished step.

    A second SIGINT (Ctrl-C again, during a long step) raises KeyboardInterrupt at once, and so does any after it
    (Python's own handler is back); the checkpoint swap is atomic, so the last complete checkpoint stays intact."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if signum == signal.SIGINT and distributed.is_main_process():
            _say("\nCtrl-C: stopping after this step, with a checkpoint; Ctrl-C again stops at once\n")
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(text: str) -> None:
    """A line to stderr from a signal handler: written to the file descriptor, since the handler may run while
    the interrupted code is inside a write to the sys.stderr buffer, which must not be entered twice."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def stopped_at_once(ckpt: Checkpointer) -> Interrupted:
    """What a second Ctrl-C leaves: the last complete checkpoint, and its step."""
    step = ckpt.complete_step()
    if step is None:
        return Interrupted("interrupted again: stopped at once, before any checkpoint was written; rerun the same "
                           "command to start over")
    return Interrupted(f"interrupted again: stopped at once; the last complete checkpoint, {ckpt.path} "
                       f"at step {step}, is intact: rerun the same command to resume from it")


def heartbeat(step: int, cfg: TrainConfig, loss: float, tokens_per_step: int, steps: int, seconds: float,
              trained: float) -> None:
    """One line for a run without a progress bar: where it is, how fast (over the `steps` that took `seconds`
    since the last line), and when it will be done (`trained`: training seconds so far, for a time budget)."""
    per_step = seconds / max(steps, 1)
    left = (cfg.steps - step) * per_step
    if cfg.time_budget_s is not None:
        left = min(left, max(0.0, cfg.time_budget_s - trained))
    eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    log.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %s", step, cfg.steps, loss,
             tokens_per_step / max(per_step, 1e-9), eta)


def train(model: nn.Module, cfg: TrainConfig, batch_fn: Callable[[int], dict[str, Tensor]], run: Run,
          ckpt: Checkpointer | str | Path, eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None
          ) -> dict[str, float]:
    """Train for cfg.steps optimizer steps (or until cfg.time_budget_s), resuming from `ckpt` (a Checkpointer, or
    the folder of one) if a checkpoint is there. The summary has the last train/loss, the steps done (train/steps)
    and the seconds they took."""
    if not isinstance(ckpt, Checkpointer):
        ckpt = Checkpointer(ckpt)
    device = run.device
    model.to(device)
    world = dist.get_world_size() if distributed.is_distributed() else 1
    if world > 1:  # launched by torchrun: FSDP2, bf16 compute where autocast would use it
        if cfg.batch_size % world:
            raise ConfigError("trainer.batch_size", f"{cfg.batch_size} is not a multiple of the {world} processes")
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        # model.cfg.activation_checkpointing (per block, inside hidden()) composes with FSDP2: no second wrapper.
        distributed.shard_model(model, param_dtype=torch.bfloat16 if bf16 else None, activation_checkpointing=False,
                                compile=cfg.compile)
    elif cfg.compile:
        model.compile_blocks()
    rows = slice(None) if world == 1 else slice(dist.get_rank() * cfg.batch_size // world,
                                                (dist.get_rank() + 1) * cfg.batch_size // world)
    optimizer = make_optimizer(model, cfg)
    step, kept_rows, summary = 0, None, {}
    ckpt.recover()
    if cfg.resume and ckpt.exists():
        extra = ckpt.load(model, optimizer)
        step, kept_rows, summary = int(extra["step"]), extra.get("metrics_rows"), extra.get("summary", {})
        tqdm.write(f"resumed from {ckpt.path} at step {step}")
    run.truncate_metrics(step, rows=kept_rows)  # a step logged twice, by a rerun after a kill, appears once
    with stop_signals() as stop:
        try:
            return _loop(model, cfg, batch_fn, run, ckpt, eval_fn, optimizer, step, rows, world, summary, stop)
        except KeyboardInterrupt:  # a second Ctrl-C
            raise stopped_at_once(ckpt) from None


def _loop(model: nn.Module, cfg: TrainConfig, batch_fn: Callable[[int], dict[str, Tensor]], run: Run,
          ckpt: Checkpointer, eval_fn: Callable[[nn.Module, int], dict[str, float]] | None,
          optimizer: torch.optim.Optimizer, step: int, rows: slice, world: int, summary: dict[str, float],
          stop: list[int]) -> dict[str, float]:
    """The steps from `step` to cfg.steps; `stop` gets a signal's number when one arrives."""
    device = run.device
    base_lrs = [cfg.gate_lr if g["name"] == "gate" else cfg.lr for g in optimizer.param_groups]
    tokens_per_step = 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    t0, window_tokens = time.perf_counter(), 0
    seconds = float(summary.get("train/seconds", 0.0))  # training time so far, restored on resume
    beat = (step, seconds)  # the step and training seconds of the last heartbeat line

    def out_of_time() -> bool:
        return cfg.time_budget_s is not None and seconds >= cfg.time_budget_s

    while step < cfg.steps and not out_of_time():
        model.train()
        started = _clock()
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, cfg, seconds)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = batch_fn(step * cfg.grad_accum + micro)
            ids, labels = batch["input_ids"][rows].to(device), batch["labels"][rows].to(device)
            with autocast(device, cfg.precision):
                loss = lm_loss(model, ids, labels) / cfg.grad_accum
            loss.backward()
            loss_sum += distributed.all_reduce_mean(loss.detach()).item()  # every rank sees the same loss
            tokens_per_step = ids.numel() * cfg.grad_accum * world
        if not math.isfinite(loss_sum):
            bar.close()
            raise _diverged(f"train/loss is {loss_sum} at step {step + 1}", ckpt)
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)).item()
        if not math.isfinite(grad_norm):  # a finite loss can still have an Inf gradient: never step on it
            bar.close()
            raise _diverged(f"train/grad_norm is {grad_norm} at step {step + 1}", ckpt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds += _clock() - started
        last = step == cfg.steps or out_of_time()
        window_tokens += tokens_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
        evaluated = eval_fn is not None and step % cfg.eval_every == 0 and not last  # the task evaluates the end
        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            metrics = {"train/loss": loss_sum, "train/lr": optimizer.param_groups[0]["lr"],
                       "train/grad_norm": grad_norm, "train/tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            if device.type == "cuda":  # the highest of any rank, so a near-OOM on one GPU is visible
                peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
                metrics["train/peak_memory_gib"] = distributed.all_reduce_max(peak).item()
            # The gates join the training row of a checkpoint step; an evaluation logs them itself, and so does
            # the task after the last step.
            gates = gate_metrics(*gate_values(model)) if step % cfg.ckpt_every == 0 and not (last or evaluated) else {}
            run.log(metrics, step=step, file_only=gates)
            t0, window_tokens = time.perf_counter(), 0
        summary.update({"train/loss": loss_sum, "train/steps": step, "train/seconds": seconds})
        if not cfg.progress and run.is_main and (seconds - beat[1] >= HEARTBEAT_S or last):
            heartbeat(step, cfg, loss_sum, tokens_per_step, step - beat[0], seconds - beat[1], seconds)
            beat = (step, seconds)
        if evaluated:
            metrics = eval_fn(model, step)
            run.log(metrics, step=step)
            summary.update(metrics)
        stopping = distributed.all_reduce_max(torch.tensor(float(bool(stop)), device=device)).item() > 0
        if step % cfg.ckpt_every == 0 or last or stopping:
            _save(ckpt, model, optimizer, step, cfg, run, summary)
        if stopping:
            bar.close()
            raise Interrupted(f"interrupted at step {step}; the checkpoint {ckpt.path} holds it: "
                              "rerun the same command to resume")
    bar.close()
    return summary

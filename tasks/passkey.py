"""Passkey retrieval (paper Table 3; the landmark-attention test of Mohtashami & Jaggi 2023).

A key of up to five digits hides in a long haystack; the prompt ends with a question whose answer is the key.
The prompt is streamed through the model one segment at a time, so its length costs time but no memory.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from omegaconf import DictConfig, ListConfig
from tqdm.auto import tqdm

from infini_bench.checkpoint import Checkpointer
from infini_bench.distributed import gathered, is_distributed
from infini_bench.errors import ConfigError, check_choice, check_positive
from infini_bench.generate import feed, generate_from, prefill, select_rows
from infini_bench.model import SegmentTransformer
from infini_bench.paper import length_label
from infini_bench.tokenizer import Tokenizer
from infini_bench.tracking import Run
from infini_bench.train import TrainConfig, autocast
from tasks import RENAMED
from tasks.common import footprint_results
from tasks.passkey_data import (
    DEPTHS, HAYSTACKS, KEY_RANGE, LOSSES, Outcome, PasskeyBatches, PasskeySample, by_distance, chance_accuracy,
    exact_match, make_sample, min_length, segments_back, summarise, token_accuracy,
)
from tasks.passkey_plots import distance_plot, grid_heatmap
from tasks.runner import Phase, Task, eval_count, train_config

log = logging.getLogger(__name__)

# ---- streaming evaluation -----------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_batch(model: SegmentTransformer, samples: Sequence[PasskeySample], tokenizer: Tokenizer
                   ) -> list[Outcome]:
    """Samples as one batch: the prompt tokens they all have (the shortest prompt's length) streamed through the
    model one segment at a time (constant memory); then, for each group of equal prompt and answer lengths, the
    few prompt tokens left, the answer teacher-forced (token accuracy) and, from the same state, decoded greedily
    by `generate_from` (a CUDA graph on a GPU) for as many tokens as the answer has (exact match; a longer number
    is wrong). Prompts of one task length differ by a few tokens (the filler is cut after a word, keys have 1 to 5
    digits), so a whole length streams once, not once per group."""
    device = model.embed.weight.device
    common = min(len(s.input_ids) for s in samples)
    prompt = torch.tensor([s.input_ids[:common] for s in samples])  # (B, P) on the host: fed a segment at a time
    first, shared = prefill(model, prompt)  # (B, V)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s.input_ids), len(s.answer_ids)), []).append(i)
    outcomes: list[Outcome | None] = [None] * len(samples)
    for rows in groups.values():
        state = shared if len(groups) == 1 else select_rows(shared, rows)
        group = [samples[i] for i in rows]
        rest = torch.tensor([s.input_ids[common:] for s in group])  # (b, the group's prompt length - P)
        last = feed(model, rest, state)[:, -1] if rest.shape[1] else first[rows]  # prediction of answer token 0
        answer = torch.tensor([s.answer_ids for s in group], device=device)  # (b, L)
        forced = [last[:, None]]
        if answer.shape[1] > 1:
            forced.append(feed(model, answer[:, :-1], copy.deepcopy(state), last_only=False))  # (b, L - 1, V)
        forced_logits = torch.cat(forced, dim=1).float()  # (b, L, V)
        generated_ids = generate_from(model, last, state, answer.shape[1], greedy=True).tokens  # (b, L)
        for i, s, row_logits, gen in zip(rows, group, forced_logits, generated_ids):
            text = tokenizer.decode(gen)
            outcomes[i] = Outcome(token_accuracy(row_logits, s.answer_ids, s.scored), exact_match(text, s.passkey),
                                  text, segments_back(s, model.cfg.segment_len))
    return outcomes


def evaluate_samples(model: SegmentTransformer, samples: Sequence[PasskeySample], tokenizer: Tokenizer,
                     batch_size: int = 16) -> list[Outcome]:
    """Outcomes in the order of `samples`, in batches of up to `batch_size` samples of nearly equal prompt
    length (sorted by it: a batch streams its shortest prompt's length together)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    outcomes: list[Outcome | None] = [None] * len(samples)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        for i, outcome in zip(chunk, evaluate_batch(model, [samples[i] for i in chunk], tokenizer)):
            outcomes[i] = outcome
    return outcomes


def evaluate_grid(model: SegmentTransformer, tokenizer: Tokenizer, lengths: Sequence[int], depths: dict[str, float],
                  samples: int, seed: int, haystack: str = "repeat", key_range: tuple[int, int] = KEY_RANGE,
                  batch_size: int = 16, progress: bool = True) -> tuple[list[dict], list[Outcome]]:
    """One row per (length, depth) cell, and every outcome. Sample i of every cell has seed `seed + i`: the same
    key at every length and depth. The cells of one length are streamed together, `batch_size` samples at a time."""
    rows, everything = [], []
    for length in tqdm(lengths, desc="passkey", disable=not progress, dynamic_ncols=True):
        batch = [make_sample(length, depth, seed + i, tokenizer, haystack, key_range)
                 for depth in depths.values() for i in range(samples)]  # cell by cell
        outcomes = evaluate_samples(model, batch, tokenizer, batch_size)
        for c, (name, depth) in enumerate(depths.items()):
            cell = outcomes[c * samples: (c + 1) * samples]
            everything += cell
            rows.append({"length": length, "length_label": length_label(length), "depth": name,
                         "depth_value": depth, **summarise(cell)})
    return rows, everything


# ---- the task -----------------------------------------------------------------------------------------------------


def _int_pair(t: DictConfig, key: str, low: int, high: int | None = None) -> tuple[int, int]:
    value = t[key]
    pair = list(value) if isinstance(value, (list, ListConfig)) else [value, value]
    if (len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not low <= pair[0] <= pair[1] or (high is not None and pair[1] > high)):
        bound = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"task.{key}", f"{value!r} must be [min, max], integers >= {low}{bound}, min <= max")
    return pair[0], pair[1]


def depth_grid(t: DictConfig) -> dict[str, float]:
    """The paper's start / middle / end, or with `depth_sweep` = k, k evenly spaced depths from 0 to 1."""
    if t.depth_sweep is not None:
        k = t.depth_sweep
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ConfigError("task.depth_sweep", f"{k!r} must be null or an integer >= 2")
        return {f"{i / (k - 1):.2f}": i / (k - 1) for i in range(k)}
    if not t.depths:
        raise ConfigError("task.depths", "must list some of " + ", ".join(DEPTHS))
    for name in t.depths:
        check_choice("task.depths", name, list(DEPTHS))
    return {name: DEPTHS[name] for name in t.depths}


def check_config(t: DictConfig, tokenizer: Tokenizer) -> None:
    for old, new in RENAMED.items():  # an experiment file written before the rename
        if old.split(".", 1)[1] in t:
            raise ConfigError(old, f"was renamed {new}")
    lengths = t.lengths
    if not isinstance(lengths, (list, ListConfig)) or not lengths:
        raise ConfigError("task.lengths", f"{lengths!r} must be a non-empty list of token counts")
    shortest = min_length(tokenizer)
    for key, values in (("task.lengths", list(lengths)), ("task.train_lengths", _int_pair(t, "train_lengths", 1))):
        for length in values:
            if not isinstance(length, int) or isinstance(length, bool) or length < shortest:
                raise ConfigError(key, f"{length!r} must be an integer of at least {shortest} tokens "
                                       "(the prompt without filler)")
    depth_grid(t)
    check_choice("task.haystack", t.haystack, HAYSTACKS)
    check_choice("task.train_haystack", t.train_haystack, HAYSTACKS)
    check_choice("task.loss_on", t.loss_on, LOSSES)
    _int_pair(t, "key_range", 1, 99999)
    if t.get("train_lengths_end") is not None:  # [min, max], each at least the prompt without filler
        _int_pair(t, "train_lengths_end", shortest)
    for key in ("samples", "eval_batch", "val_samples", "local_warmup_segment_len"):
        check_positive(f"task.{key}", t[key])
    for key in ("local_warmup_steps", "key_ramp_steps", "length_ramp_steps", "length_ramp_start"):
        value = t.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"task.{key}", f"{value!r} must be an integer >= 0")


def _flat(rows: Sequence[dict], overall: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        out[f"passkey/acc@{r['length_label']}/{r['depth']}"] = r["acc"]
        out[f"passkey/exact@{r['length_label']}/{r['depth']}"] = r["exact"]
    for where in ("earlier", "same"):
        out[f"passkey/n/{where}_segment"] = overall[f"n_{where}"]
        if overall[f"n_{where}"]:
            out[f"passkey/acc/{where}_segment"] = overall[f"acc_{where}"]
            out[f"passkey/exact/{where}_segment"] = overall[f"exact_{where}"]
    return out


def _cell_lengths(rows: Sequence[dict]) -> list[int]:
    """The prompt length of every outcome, in evaluate_grid's order (each row's `n` outcomes in turn)."""
    return [r["length"] for r in rows for _ in range(r["n"])]


class _StepOffset:
    """The run, with every step it is given moved past an earlier training phase."""

    def __init__(self, run: Run, offset: int):
        self._run, self._offset = run, offset

    def __getattr__(self, name: str):
        return getattr(self._run, name)

    def _shift(self, step: int | None) -> int | None:
        return None if step is None else step + self._offset

    def log(self, metrics: dict[str, float], step: int | None = None, to_wandb: bool = True,
            file_only: dict[str, float] | None = None) -> None:
        self._run.log(metrics, self._shift(step), to_wandb, file_only)

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        self._run.log_image(key, path, self._shift(step))

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
                  save: bool = True) -> None:
        self._run.log_table(key, columns, rows, self._shift(step), save)

    def truncate_metrics(self, after_step: int, rows: int | None = None) -> None:
        self._run.truncate_metrics(self._shift(after_step), rows)


class Passkey(Task):
    """Optionally a warm-up on local attention, then training on passkey prompts; evaluated on the grid of
    lengths and depths."""

    def setup(self) -> TrainConfig:
        t, run, model = self.t, self.run, self.model
        check_config(t, self.tokenizer)
        tcfg = train_config(self.cfg)
        self.depths = depth_grid(t)
        self.key_range = _int_pair(t, "key_range", 1, 99999)
        model.to(run.device)
        if tcfg.compile and not is_distributed():  # the streamed evaluation runs compiled too (2x at 1M tokens)
            model.compile_blocks()
        self.steps = 0 if t.zero_shot else tcfg.steps
        self.warmup = t.local_warmup_steps if self.steps else 0  # steps=0 or zero_shot: evaluation only, no warm-up
        m, longest = self.cfg.model, _int_pair(t, "train_lengths", 1)[1]
        if self.steps and not self.warmup and not (m.get("init_from") or m.get("pretrained")) \
                and longest > model.cfg.segment_len:  # the key leaves local attention's view from the start
            log.warning("passkey: random weights, no local warm-up and prompts longer than a segment: the model must "
                        "first learn to copy a key it can see (docs/PASSKEY.md). Set task.local_warmup_steps, or "
                        "model.init_from=<an experiment=passkey_gpu_base run>/model.safetensors")
        return tcfg

    def _grid(self, m: SegmentTransformer, lengths: Sequence[int], names: dict[str, float], n: int, progress: bool):
        with gathered(m) as whole, autocast(self.run.device, self.tcfg.precision):  # under FSDP: a whole replica
            whole.eval()
            return evaluate_grid(whole, self.tokenizer, lengths, names, n, self.t.seed, self.t.haystack,
                                 self.key_range, self.t.eval_batch, progress)

    def validate(self, model: SegmentTransformer) -> dict[str, float]:
        """A quick look during training: the needle at the start of the shortest evaluation length."""
        rows, _ = self._grid(model, [min(self.t.lengths)], {"start": 0.0}, self.t.val_samples, progress=False)
        return {f"passkey/val_acc@{rows[0]['length_label']}/start": rows[0]["acc"]}

    def phases(self) -> Iterator[Phase]:
        """The warm-up on local attention (a copy of the model with short segments, its own checkpoints), then
        the main phase, which logs its steps after the warm-up's."""
        t, tcfg, run, model, warmup = self.t, self.tcfg, self.run, self.model, self.warmup
        lengths = _int_pair(t, "train_lengths", 1)
        lengths_end = _int_pair(t, "train_lengths_end", 1) if t.get("train_lengths_end") is not None else None
        # The curricula count steps; the batches count micro-batches. Each phase ramps the keys from its own start.
        key_ramp = t.get("key_ramp_steps", 0) * tcfg.grad_accum
        length_ramp = t.get("length_ramp_steps", 0) * tcfg.grad_accum
        length_start = t.get("length_ramp_start", 0) * tcfg.grad_accum
        if warmup and is_distributed():
            raise ConfigError("task.local_warmup_steps", f"{warmup}: the warm-up runs in a single process; set 0 "
                              "under torchrun")
        main = Checkpointer.of_run(run.out_dir)
        main.recover()  # a swap a crash interrupted: before looking for it
        if warmup and not (tcfg.resume and main.exists()):  # else the main phase has it
            local = SegmentTransformer(dataclasses.replace(model.cfg, segment_len=t.local_warmup_segment_len))
            local.to(run.device).load_state_dict(model.state_dict())
            batches = PasskeyBatches(self.tokenizer, lengths, tcfg.batch_size, tcfg.seed + 1_000_003, t.loss_on,
                                     t.train_haystack, self.key_range, key_ramp)
            # A constant learning rate after the ramp: the copy must be learned by the end of the warm-up.
            yield Phase(local, dataclasses.replace(tcfg, steps=warmup, schedule="constant", eval_every=warmup + 1),
                        batches, run, Checkpointer.of_run(run.out_dir, "warmup"), validate=False)
            model.load_state_dict(local.state_dict())
        if self.steps:
            batches = PasskeyBatches(self.tokenizer, lengths, tcfg.batch_size, tcfg.seed, t.loss_on,
                                     t.train_haystack, self.key_range, key_ramp, lengths_end, length_ramp,
                                     length_start)
            yield Phase(model, tcfg, batches, _StepOffset(run, warmup), main)

    @property
    def final_step(self) -> int:
        """The last step trained, the warm-up's counted: fewer than configured when trainer.time_budget_s ends the
        main phase first. `summary` is the main phase's, whose steps count from 0 (no training: no warm-up either)."""
        return self.warmup + int(self.summary.get("train/steps", self.steps))

    def evaluate(self, model: SegmentTransformer, summary: dict) -> dict:
        t = self.t
        rows, outcomes = self._grid(model, list(t.lengths), self.depths, eval_count(t), progress=self.tcfg.progress)
        overall = summarise(outcomes)
        results: dict = {**_flat(rows, overall), "passkey/acc": overall["acc"], "passkey/exact": overall["exact"]}
        outcome_lengths = _cell_lengths(rows)
        for length in dict.fromkeys(outcome_lengths):  # what the memory carried, length by length
            at = summarise([o for o, n in zip(outcomes, outcome_lengths) if n == length])
            if at["n_earlier"]:
                results[f"passkey/acc_earlier@{length_label(length)}"] = at["acc_earlier"]
                results[f"passkey/exact_earlier@{length_label(length)}"] = at["exact_earlier"]
        if len(self.tokenizer.encode("0123456789")) == 10:  # one token per digit: the blind guess is well defined
            results["passkey/chance"] = chance_accuracy(self.key_range)
        results["passkey/by_segments_back"] = by_distance(outcomes)
        results.update({"train/steps": self.final_step, "train/loss": summary.get("train/loss"), "passkey/grid": rows,
                        **footprint_results(model.cfg, max(t.lengths))})
        return results

    def artefacts(self, results: dict) -> None:
        """The grid as a table and a heatmap, and accuracy by how many segments back the key was."""
        run, steps, rows = self.run, self.final_step, results["passkey/grid"]
        columns = ["length", "depth", "depth_value", "n", "acc", "exact", "segments_back", "n_earlier",
                   "acc_earlier", "n_same", "acc_same"]
        run.log_table("passkey/grid", columns, [[r[c] for c in columns] for r in rows])
        mode = "zero-shot" if not steps else f"{steps} training steps"
        title = f"passkey token accuracy, memory={self.cfg.memory.name}, {mode}"
        run.log_image("passkey/heatmap", grid_heatmap(rows, Path(run.out_dir) / "passkey_heatmap.png", title),
                      step=steps)
        if run.is_main:
            plot = distance_plot(results["passkey/by_segments_back"], Path(run.out_dir) / "passkey_by_distance.png",
                                 f"passkey by distance, memory={self.cfg.memory.name}, {mode}",
                                 results.get("passkey/chance"))
            run.log_image("passkey/by_distance", plot, step=steps)


TASK = Passkey

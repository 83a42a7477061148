"""Multi-query associative recall across segments: the MQAR probe of Zoology (Arora et al. 2023), laid out so that
only the memory can carry the pairs. A diagnostic beyond the paper (docs/RECALL.md).

A sample is `pairs` key-value token pairs, ending on a segment boundary; then `gap` whole segments of filler; then
every key again, in a random order, each followed by a filler token: the value it asks for is the label at the key's
position, scored and never shown, so no answer can be inferred from the answers before it. The queries start
at least one segment after the last pair, so a model that sees only its own segment (memory=none) is at chance,
1 / task.vocab, by construction; Transformer-XL's one cached segment reaches the last segment of pairs at gap 0.
Token ids are used directly, no text: keys from [0, vocab), values from [vocab, 2 vocab), filler from
[2 vocab, 2 vocab + filler), so no filler token is a key or a value.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from infini_bench.distributed import gathered
from infini_bench.errors import ConfigError, check_int
from infini_bench.evaluate import streamed_hits
from infini_bench.model import SegmentTransformer
from infini_bench.plots import distance_label, percent_heatmap
from infini_bench.train import TrainConfig
from tasks.common import footprint_results, no_batches
from tasks.runner import Task, eval_count, train_config


class Layout(NamedTuple):
    """What every sample of a run shares: the segment length and the sizes of the three id ranges."""

    segment_len: int
    vocab: int  # keys are drawn from `vocab` ids, values from as many others
    filler: int  # filler ids, after both

    def ids(self) -> int:
        """Token ids the samples use: the model's vocabulary must hold them."""
        return 2 * self.vocab + self.filler

    def length(self, pairs: int, gap: int) -> int:
        """Tokens of a sample: the pairs padded to whole segments, the gap, the queries."""
        n = self.segment_len
        return -(-2 * pairs // n) * n + gap * n + 2 * pairs


class RecallBatch(NamedTuple):
    """Samples of one (pairs, gap) as rows. labels[:, t] is the target of position t: a value after its query
    key, -100 elsewhere. segments_back (B, pairs), in query order, is how many segments the query's position
    lies after its pair's value (at least gap + 1)."""

    input_ids: Tensor
    labels: Tensor
    segments_back: Tensor


def draw_samples(layout: Layout, pairs: int, gap: int, rows: int, g: torch.Generator) -> RecallBatch:
    """`rows` samples of one (pairs, gap) from the generator `g`, drawn together (a training batch of 512 costs a
    few tensor operations, not 512 of each). The keys, values and query order are drawn before the filler, so
    samples from one generator state differ across gaps only in the distance."""
    n, vocab = layout.segment_len, layout.vocab
    keys = torch.rand(rows, vocab, generator=g).topk(pairs, 1).indices  # distinct, in a random order
    values = vocab + torch.randint(vocab, (rows, pairs), generator=g)  # with replacement
    order = torch.rand(rows, pairs, generator=g).argsort(1)
    slots = 2 * vocab + torch.randint(layout.filler, (rows, pairs), generator=g)  # in place of the answers
    pad = -(-2 * pairs // n) * n - 2 * pairs  # filler before the pairs, so they end on a segment boundary
    noise = 2 * vocab + torch.randint(layout.filler, (rows, pad + gap * n), generator=g)
    written = torch.stack([keys, values], 2).flatten(1)
    # The answers are scored but never shown: after each query key comes a filler token, not its value. Shown
    # (teacher-forced), they would let a model that never looks a key up answer by elimination, naming a value
    # written but not yet asked for: at P pairs that scores H(P) / P (0.34 at 8 pairs), well above 1 / P.
    queries = torch.stack([keys.gather(1, order), slots], 2).flatten(1)
    tokens = torch.cat([noise[:, :pad], written, noise[:, pad:], queries], 1)
    first = layout.length(pairs, gap) - 2 * pairs  # position of the first query key
    targets = torch.full_like(tokens, -100)
    targets[:, first + 1::2] = values.gather(1, order)
    read = first + 2 * torch.arange(pairs)  # where each value is predicted
    back = read // n - (pad + 2 * order + 1) // n  # segments from where that value was written
    return RecallBatch(tokens[:, :-1], targets[:, 1:], back)


def make_sample(layout: Layout, pairs: int, gap: int, seed: int) -> RecallBatch:
    """One sample (rows of one), a pure function of its arguments."""
    return draw_samples(layout, pairs, gap, 1, torch.Generator().manual_seed(seed))


def make_batch(layout: Layout, pairs: int, gap: int, seeds: Sequence[int]) -> RecallBatch:
    samples = [make_sample(layout, pairs, gap, s) for s in seeds]
    return RecallBatch(*(torch.cat(parts) for parts in zip(*samples)))


class RecallBatches:
    """The trainer's batch_fn: micro-batch i holds `batch_size` samples of one (pairs, gap), a pure function of
    (seed, i), so a resumed run sees the same batches. Pairs are drawn log-uniformly from `min_pairs` to `pairs`
    (each octave as often as the next), the gap uniformly from 0 to `gap` segments: every distance up to the
    evaluated ones, the short ones too. Below two pairs, copying the one value seen is always right: a floor of
    several pairs leaves copying nothing to gain over a lookup."""

    def __init__(self, layout: Layout, pairs: int, gap: int, batch_size: int, seed: int, min_pairs: int = 1):
        self.layout, self.pairs, self.gap, self.batch_size, self.seed = layout, pairs, gap, batch_size, seed
        self.min_pairs = min_pairs

    def __call__(self, i: int) -> dict[str, Tensor]:
        rng = random.Random(f"recall-train:{self.seed}:{i}")  # str seeds hash with SHA-512: stable across runs
        low, high = math.log(self.min_pairs), math.log(self.pairs + 1)
        pairs = min(self.pairs, int(math.exp(rng.uniform(low, high))))
        gap = rng.randint(0, self.gap)
        g = torch.Generator().manual_seed(rng.getrandbits(62))
        batch = draw_samples(self.layout, pairs, gap, self.batch_size, g)
        return {"input_ids": batch.input_ids, "labels": batch.labels}


# ---- evaluation ---------------------------------------------------------------------------------------------------


def score_cell(model: SegmentTransformer, layout: Layout, pairs: int, gap: int, samples: int, seed: int,
               batch_size: int, precision: str) -> tuple[Tensor, Tensor]:
    """Argmax hits of every value token of a cell and how many segments back its pair was, both (samples x
    pairs,). Sample i has seed `seed + i` in every cell. Streamed one segment at a time (`streamed_hits`)."""
    device = model.embed.weight.device
    hits, back = [], []
    for start in range(0, samples, batch_size):
        batch = make_batch(layout, pairs, gap, range(seed + start, seed + min(samples, start + batch_size)))
        labels = batch.labels.to(device)
        found = streamed_hits(model, batch.input_ids.to(device), labels, precision)
        hits.append(found[labels != -100].cpu())  # row by row, queries in order: as segments_back
        back.append(batch.segments_back.flatten())
    return torch.cat(hits), torch.cat(back)


def by_distance(hits: Tensor, back: Tensor) -> list[dict]:
    """Accuracy by segments between write and read, in bins 1, 2-3, 4-7, ... (powers of two): a cell of many
    pairs spans several, since its first pairs were written segments before its last."""
    octave = torch.floor(torch.log2(back.double())).long() + 1  # back >= 1: 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...
    rows = []
    for k in octave.unique().tolist():
        hit = hits[octave == k]
        rows.append({"segments_back": distance_label(k), "n": hit.numel(), "acc": hit.float().mean().item()})
    return rows


def _mean_acc(rows: Sequence[dict]) -> float:
    return sum(r["acc"] for r in rows) / len(rows)


def grid_results(rows: Sequence[dict], distance: Sequence[dict]) -> dict[str, float]:
    """The headline numbers: every cell, each pair count and each gap (means over cells: every cell weighs the same,
    so 512 pairs do not drown 8), overall, and by segments back."""
    out = {"recall/acc": _mean_acc(rows)}
    out.update({f"recall/acc@pairs={r['pairs']},gap={r['gap']}": r["acc"] for r in rows})
    for key in ("pairs", "gap"):
        for value in dict.fromkeys(r[key] for r in rows):
            out[f"recall/acc@{key}={value}"] = _mean_acc([r for r in rows if r[key] == value])
    out.update({f"recall/acc@segments_back={d['segments_back']}": d["acc"] for d in distance})
    return out


# ---- the task -----------------------------------------------------------------------------------------------------


def _int_list(t: DictConfig, key: str, low: int) -> list[int]:
    value = t[key]
    if (not isinstance(value, (list, ListConfig)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        raise ConfigError(f"task.{key}", f"{value!r} must be a non-empty list of integers >= {low}")
    return list(value)


def check_config(t: DictConfig) -> None:
    """The values that need no model: counts, and pair counts the key range can hold (keys are distinct)."""
    for key, low in (("vocab", 1), ("filler", 1), ("pairs", 1), ("min_pairs", 1), ("gap_segments", 0),
                     ("samples", 1), ("eval_batch", 1), ("val_samples", 1), ("seed", 0)):
        check_int(f"task.{key}", t[key], low)
    if t.min_pairs > t.pairs:
        raise ConfigError("task.min_pairs", f"{t.min_pairs} is more than task.pairs={t.pairs}")
    for key, counts in (("pairs", [t.pairs]), ("eval_pairs", _int_list(t, "eval_pairs", 1))):
        if max(counts) > t.vocab:
            raise ConfigError(f"task.{key}", f"{max(counts)} pairs need as many distinct keys, more than "
                              f"task.vocab={t.vocab}")
    _int_list(t, "eval_gaps", 0)


class Recall(Task):
    """Training on fresh samples every step, then exact-match accuracy of the values on a grid of pair counts
    and gaps."""

    @staticmethod
    def check_values(cfg: DictConfig) -> None:
        check_config(cfg.task)

    def check(self) -> None:
        check_config(self.t)

    def setup(self) -> TrainConfig:
        t, model = self.t, self.model
        self.layout = Layout(model.cfg.segment_len, t.vocab, t.filler)
        if self.layout.ids() > model.cfg.vocab_size:
            raise ConfigError("task.vocab", f"{t.vocab}: keys, values and filler take 2 x {t.vocab} + "
                              f"task.filler={t.filler} = {self.layout.ids()} token ids, more than the model's "
                              f"vocab_size {model.cfg.vocab_size}")
        model.to(self.run.device)
        return train_config(self.cfg)

    def batches(self):
        tcfg = self.tcfg
        if not tcfg.steps:
            return no_batches
        return RecallBatches(self.layout, self.t.pairs, self.t.gap_segments, tcfg.batch_size, tcfg.seed,
                             self.t.min_pairs)

    def _cells(self, model: SegmentTransformer, cells: Sequence[tuple[int, int]], samples: int):
        with gathered(model) as whole:  # under FSDP: a whole replica
            whole.eval()
            return [(p, g, *score_cell(whole, self.layout, p, g, samples, self.t.seed, self.t.eval_batch,
                                       self.tcfg.precision)) for p, g in cells]

    def validate(self, model: SegmentTransformer) -> dict[str, float]:
        """A quick look during training: the fewest pairs at the shortest gap."""
        pairs, gap = min(self.t.eval_pairs), min(self.t.eval_gaps)
        ((_, _, hits, _),) = self._cells(model, [(pairs, gap)], self.t.val_samples)
        return {f"recall/val_acc@pairs={pairs},gap={gap}": hits.float().mean().item()}

    def evaluate(self, model: SegmentTransformer, summary: dict) -> dict:
        t = self.t
        cells = [(p, g) for p in t.eval_pairs for g in t.eval_gaps]
        scored = self._cells(model, cells, eval_count(t))
        rows = [{"pairs": p, "gap": g, "n": hits.numel(), "acc": hits.float().mean().item(),
                 "segments_back_min": int(back.min()), "segments_back_max": int(back.max())}
                for p, g, hits, back in scored]
        distance = by_distance(torch.cat([s[2] for s in scored]), torch.cat([s[3] for s in scored]))
        longest = max(self.layout.length(p, g) for p, g in cells)
        return {**grid_results(rows, distance), "recall/chance": 1 / t.vocab, "recall/grid": rows,
                "recall/by_segments_back": distance, "train/steps": self.final_step,
                "train/loss": summary.get("train/loss"), **footprint_results(model.cfg, longest)}

    def artefacts(self, results: dict) -> None:
        """The grid and the distances as tables, and the grid as a heatmap (recall_grid.png)."""
        run, step, rows = self.run, self.final_step, results["recall/grid"]
        columns = ["pairs", "gap", "n", "acc", "segments_back_min", "segments_back_max"]
        run.log_table("recall/grid", columns, [[r[c] for c in columns] for r in rows], step=step)
        run.log_table("recall/by_segments_back", ["segments_back", "n", "acc"],
                      [[d["segments_back"], d["n"], d["acc"]] for d in results["recall/by_segments_back"]], step=step)
        if run.is_main:
            pairs, gaps = list(dict.fromkeys(r["pairs"] for r in rows)), list(dict.fromkeys(r["gap"] for r in rows))
            acc = {(r["pairs"], r["gap"]): r["acc"] for r in rows}
            title = (f"recall accuracy, memory={self.cfg.memory.name}, {step} training steps "
                     f"(chance {100 * results['recall/chance']:.1f}%)")
            heatmap = percent_heatmap([[acc[p, g] for g in gaps] for p in pairs], [str(p) for p in pairs],
                                      [str(g) for g in gaps], Path(run.out_dir) / "recall_grid.png",
                                      "gap (whole segments of filler)", "key-value pairs", title)
            run.log_image("recall/heatmap", heatmap, step=step)


TASK = Recall

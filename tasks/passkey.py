"""Passkey retrieval (paper Table 3; the landmark-attention test of Mohtashami & Jaggi 2023).

A key of up to five digits hides in a long haystack; the prompt ends with a question whose answer is the key.
The prompt is streamed through the model one segment at a time, so its length costs time but no memory.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, ListConfig  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from infini_bench.data import corpus_dir  # noqa: E402
from infini_bench.checkpoint import Checkpointer  # noqa: E402
from infini_bench.distributed import gathered, is_distributed  # noqa: E402
from infini_bench.errors import ConfigError, check_choice, check_positive  # noqa: E402
from infini_bench.generate import decode_step, feed, prefill  # noqa: E402
from infini_bench.model import SegmentTransformer  # noqa: E402
from infini_bench.paper import length_label  # noqa: E402
from infini_bench.plots import save_figure  # noqa: E402
from infini_bench.tokenizer import Tokenizer  # noqa: E402
from infini_bench.tracking import Run  # noqa: E402
from infini_bench.train import autocast, train  # noqa: E402
from tasks import RENAMED  # noqa: E402
from tasks.common import (  # noqa: E402
    build_model_and_tokenizer, eval_count, export_weights, footprint_results, log_gates,
    log_setting, train_config,
)

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# The paper's start / middle / end, as the fraction of the haystack that precedes the needle. 0 puts the needle
# right after the task description, 1 right before the question: only then can the paper's zero-shot "end"
# column (97-100% with 2K segments, against 3-14% elsewhere) come from local attention alone.
DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}
HAYSTACKS = ("repeat", "books")
LOSSES = ("answer", "all")
KEY_RANGE = (1, 50000)  # the landmark-attention test draws randint(1, 50000)


class PasskeySample(NamedTuple):
    """One prompt; token positions index `input_ids`, the answer follows the prompt."""

    text: str
    input_ids: list[int]
    passkey: str
    needle_start: int
    needle_end: int
    key_end: int  # one past the last key token of the needle (its second copy of the key)
    answer_ids: list[int]  # tokens of " {passkey}."
    scored: list[bool]  # which answer tokens carry digits: the tokens the paper's accuracy counts


def _books_dir() -> Path:
    """The embedded books, shipped with the package."""
    return corpus_dir() / "pg_books"


@lru_cache(maxsize=None)
def _book_words(path: Path) -> tuple[str, ...]:
    """A book as words; Gutenberg's CRLF line ends and paragraph breaks become single spaces."""
    return tuple(path.read_text(encoding="utf-8", errors="replace").split())


def _haystack_words(haystack: str, rng: random.Random, books_dir: Path | None) -> tuple[Sequence[str], int]:
    """The words the filler cycles through, and where the prefix starts in them."""
    if haystack == "repeat":
        return FILLER.split(" "), 0
    books = sorted((books_dir or _books_dir()).glob("*.txt"))
    if not books:
        raise FileNotFoundError(f"no *.txt books in {books_dir or _books_dir()}")
    words = _book_words(rng.choice(books))
    return words, rng.randrange(len(words))


class _Encoder:
    """Token counts of haystack words, cached: the layout is planned with them before anything is encoded."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, int] = {}

    def count(self, word: str) -> int:
        if word not in self.cache:
            self.cache[word] = len(self.tok.encode(" " + word))
        return self.cache[word]

    def take(self, words: Sequence[str], start: int, budget: int) -> int:
        """How many words, cycling from `start`, come closest to `budget` tokens (a line end included)."""
        if budget <= 0:
            return 0
        total, n = 1, 0  # 1 for the line end
        while True:
            c = self.count(words[(start + n) % len(words)])
            if total + c - budget > budget - total:  # one more word would overshoot by more than we undershoot
                return n
            total, n = total + c, n + 1


def _line(words: Sequence[str], start: int, n: int) -> str:
    return " ".join(words[(start + i) % len(words)] for i in range(n)) + "\n" if n else ""


def min_length(tokenizer: Tokenizer) -> int:
    """Tokens of a prompt with a five-digit key and no filler: the shortest length `make_sample` accepts."""
    return len(tokenizer.encode(DESCRIPTION + "\n" + NEEDLE.format(key="99999") + "\n" + QUESTION))


def make_sample(length: int, depth: float | None, seed: int, tokenizer: Tokenizer, haystack: str = "repeat",
                key_range: tuple[int, int] = KEY_RANGE, books_dir: Path | None = None) -> PasskeySample:
    """A prompt of `length` tokens (within 1%) with the needle after a fraction `depth` of the haystack.

    The seed fixes the key and, with depth=None or the books haystack, the layout: the depth, which book and
    where in it. input_ids are the concatenated encodings of the prompt's lines, so the needle's token
    position is exact; with the byte tokenizer they equal `tokenizer.encode(text)`.
    """
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack={haystack!r} is not one of {', '.join(HAYSTACKS)}")
    rng = random.Random(seed)
    key = str(rng.randint(*key_range))
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is not in [0, 1]")
    words, start = _haystack_words(haystack, rng, books_dir)
    head = tokenizer.encode(DESCRIPTION + "\n")
    # Encoded in two pieces, so that the position where the key's second copy ends is exact.
    split = NEEDLE.rindex("{key}") + len("{key}")
    needle_keys = tokenizer.encode(NEEDLE[:split].format(key=key))
    needle = needle_keys + tokenizer.encode(NEEDLE[split:] + "\n")
    question = tokenizer.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length={length} is shorter than the prompt without filler ({length - budget} tokens)")

    enc = _Encoder(tokenizer)
    n_pre = enc.take(words, start, round(depth * budget))
    pre_text = _line(words, start, n_pre)
    pre = tokenizer.encode(pre_text)
    # The paper's second filler block starts over; the books' continues the text.
    start2 = 0 if haystack == "repeat" else start + n_pre
    post_text = _line(words, start2, enc.take(words, start2, budget - len(pre)))
    post = tokenizer.encode(post_text)

    answer = tokenizer.encode(f" {key}.")
    return PasskeySample(
        text=DESCRIPTION + "\n" + pre_text + NEEDLE.format(key=key) + "\n" + post_text + QUESTION,
        input_ids=head + pre + needle + post + question,
        passkey=key,
        needle_start=len(head) + len(pre),
        needle_end=len(head) + len(pre) + len(needle),
        key_end=len(head) + len(pre) + len(needle_keys),
        answer_ids=answer,
        scored=[any(c.isdigit() for c in tokenizer.decode([t])) for t in answer],
    )


# ---- scoring ------------------------------------------------------------------------------------------------------


def token_accuracy(logits: Tensor, answer_ids: Sequence[int], scored: Sequence[bool]) -> float:
    """The paper's metric: the fraction of key tokens whose argmax is right under teacher forcing.

    logits (L, V): row i is the prediction of answer_ids[i] given the prompt and answer_ids[:i].
    """
    pred = logits.argmax(dim=-1).tolist()
    hits = [p == t for p, t, s in zip(pred, answer_ids, scored, strict=True) if s]
    if not hits:
        raise ValueError("no answer token is scored")
    return sum(hits) / len(hits)


def exact_match(generated: str, passkey: str) -> bool:
    """Whether the generated text starts with the key and nothing but the key as its number."""
    found = re.match(r"\s*(\d+)", generated)
    return found is not None and found.group(1) == passkey


def chance_accuracy(key_range: tuple[int, int] = KEY_RANGE) -> float:
    """Token accuracy of the best guess that never saw the needle, with one token per digit (byte tokenizer).

    Under teacher forcing, the guess for each digit is the commonest digit after the digits before it among
    all keys of the range. A model without memory can learn this prior, so it is the floor to compare with.
    """
    keys = [str(k) for k in range(key_range[0], key_range[1] + 1)]
    counts: dict[str, Counter] = {}
    for key in keys:
        for j, c in enumerate(key):
            counts.setdefault(key[:j], Counter())[c] += 1
    best = {prefix: c.most_common(1)[0][0] for prefix, c in counts.items()}
    return sum(sum(best[k[:j]] == k[j] for j in range(len(k))) / len(k) for k in keys) / len(keys)


# ---- streaming evaluation -----------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """How one sample went, and where its needle sat relative to the question."""

    token_acc: float
    exact: bool
    generated: str
    segments_back: int  # segment of the prompt's last token minus that of the key's last token; 0 = same


def segments_back(sample: PasskeySample, segment_len: int) -> int:
    """How many segments before the question's last token the key's last token sits. 0: local attention can
    see the key, so the sample tests local attention, not the memory (docs/PAPER_NOTES.md, pitfall 6)."""
    return (len(sample.input_ids) - 1) // segment_len - (sample.key_end - 1) // segment_len


@torch.inference_mode()
def evaluate_batch(model: SegmentTransformer, samples: Sequence[PasskeySample], tokenizer: Tokenizer
                   ) -> list[Outcome]:
    """Samples of equal prompt and answer lengths as one batch: the prompt streamed through the model one
    segment at a time (constant memory), then the answer teacher-forced (token accuracy) and, from the same
    state, decoded greedily for as many tokens as the answer has (exact match; a longer number is wrong)."""
    device = model.embed.weight.device
    prompt = torch.tensor([s.input_ids for s in samples])  # (B, P) on the host: feed moves one segment at a time
    answer = torch.tensor([s.answer_ids for s in samples], device=device)  # (B, L)
    first, state = prefill(model, prompt)  # (B, V): the prediction of answer token 0
    forced = [first[:, None]]
    if answer.shape[1] > 1:
        forced.append(feed(model, answer[:, :-1], copy.deepcopy(state), last_only=False))  # (B, L - 1, V)
    forced_logits = torch.cat(forced, dim=1).float()  # (B, L, V)
    logits, generated = first, []
    for i in range(answer.shape[1]):
        token = logits.argmax(dim=-1)  # (B,)
        generated.append(token)
        if i + 1 < answer.shape[1]:
            logits = decode_step(model, token, state)
    generated_ids = torch.stack(generated, dim=1).tolist()  # (B, L)
    outcomes = []
    for s, row_logits, gen in zip(samples, forced_logits, generated_ids):
        text = tokenizer.decode(gen)
        outcomes.append(Outcome(token_accuracy(row_logits, s.answer_ids, s.scored), exact_match(text, s.passkey),
                                text, segments_back(s, model.cfg.segment_len)))
    return outcomes


def evaluate_samples(model: SegmentTransformer, samples: Sequence[PasskeySample], tokenizer: Tokenizer,
                     batch_size: int = 16) -> list[Outcome]:
    """Outcomes in the order of `samples`, batching those of equal prompt and answer lengths."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s.input_ids), len(s.answer_ids)), []).append(i)
    outcomes: list[Outcome | None] = [None] * len(samples)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start: start + batch_size]
            for i, outcome in zip(chunk, evaluate_batch(model, [samples[i] for i in chunk], tokenizer)):
                outcomes[i] = outcome
    return outcomes


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(outcomes: Sequence[Outcome]) -> dict:
    """Token accuracy and exact match over all outcomes, and split by where the needle sat."""
    earlier = [o for o in outcomes if o.segments_back > 0]
    same = [o for o in outcomes if o.segments_back == 0]
    return {
        "n": len(outcomes), "acc": _mean([o.token_acc for o in outcomes]), "exact": _mean([o.exact for o in outcomes]),
        "n_earlier": len(earlier), "acc_earlier": _mean([o.token_acc for o in earlier]),
        "exact_earlier": _mean([o.exact for o in earlier]),
        "n_same": len(same), "acc_same": _mean([o.token_acc for o in same]),
        "exact_same": _mean([o.exact for o in same]),
        "segments_back": _mean([o.segments_back for o in outcomes]),
    }


def evaluate_grid(model: SegmentTransformer, tokenizer: Tokenizer, lengths: Sequence[int], depths: dict[str, float],
                  samples: int, seed: int, haystack: str = "repeat", key_range: tuple[int, int] = KEY_RANGE,
                  batch_size: int = 16, progress: bool = True) -> tuple[list[dict], list[Outcome]]:
    """One row per (length, depth) cell, and every outcome. Sample i of every cell has seed `seed + i`: the same
    key at every length and depth."""
    rows, everything = [], []
    cells = [(length, name, depth) for length in lengths for name, depth in depths.items()]
    for length, name, depth in tqdm(cells, desc="passkey", disable=not progress, dynamic_ncols=True):
        batch = [make_sample(length, depth, seed + i, tokenizer, haystack, key_range) for i in range(samples)]
        outcomes = evaluate_samples(model, batch, tokenizer, batch_size)
        everything += outcomes
        rows.append({"length": length, "length_label": length_label(length), "depth": name, "depth_value": depth,
                     **summarise(outcomes)})
    return rows, everything


def grid_heatmap(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Token accuracy per cell: lengths across, depths down (the needle-in-a-haystack picture)."""
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    acc = {(r["length"], r["depth"]): r["acc"] for r in rows}
    grid = [[100 * acc[(length, d)] for length in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="token accuracy (%)")
    return save_figure(fig, path)


def by_distance(outcomes: Sequence[Outcome]) -> list[dict]:
    """Token accuracy and exact match by how many segments separate the key from the question, in bins 0, 1,
    2-3, 4-7, ... (powers of two); empty bins are left out."""
    bins: dict[int, list[Outcome]] = {}
    for o in outcomes:
        bins.setdefault(o.segments_back.bit_length(), []).append(o)  # 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...
    rows = []
    for b in sorted(bins):
        group = bins[b]
        rows.append({"segments_back_min": 0 if b == 0 else 2 ** (b - 1), "segments_back_max": 2 ** b - 1 if b else 0,
                     "n": len(group), "acc": _mean([o.token_acc for o in group]),
                     "exact": _mean([o.exact for o in group])})
    return rows


def distance_figure(rows: Sequence[dict], title: str, chance: float | None = None) -> matplotlib.figure.Figure:
    """Accuracy against the number of segments between the key and the question: does the memory hold up? Token
    accuracy and exact match often coincide (both 0 or 100), so they differ in every way but colour can't show:
    a thick translucent line with dots under a thin dashed one with hollow squares, both visible where they meet."""
    labels = [str(r["segments_back_min"]) if r["segments_back_min"] == r["segments_back_max"]
              else f"{r['segments_back_min']}-{r['segments_back_max']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4), layout="constrained")
    x = range(len(rows))
    ax.plot(x, [100 * r["acc"] for r in rows], marker="o", markersize=7, linewidth=3, alpha=0.6,
            label="token accuracy")
    ax.plot(x, [100 * r["exact"] for r in rows], marker="s", markersize=9, markerfacecolor="none",
            markeredgewidth=1.5, linewidth=1.5, linestyle="--", label="exact match")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle=":", label="chance (token accuracy)")
    for i, r in enumerate(rows):
        ax.annotate(f"n={r['n']}", (i, 100 * r["acc"]), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=7)
    ax.set_xticks(list(x), labels, rotation=45 if len(rows) > 8 else 0)
    ax.set_ylim(-5, 110)
    ax.set_xlabel("segments between the key and the question\n(0: the same segment, local attention)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def distance_plot(rows: Sequence[dict], path: Path, title: str, chance: float | None = None) -> Path:
    """`distance_figure`, saved as a PNG."""
    return save_figure(distance_figure(rows, title, chance), path)


# ---- fine-tuning data ---------------------------------------------------------------------------------------------


def ramp(i: int, span: int) -> float:
    """How far micro-batch i is through a curriculum of `span` micro-batches: 0 at the start, 1 from `span` on."""
    return 1.0 if span <= 0 else min(1.0, i / span)


class PasskeyBatches:
    """The trainer's batch_fn: micro-batch i holds `batch_size` samples of one length, a pure function of (seed, i).

    The length is drawn from `lengths` (min, max), the depth uniformly from [0, 1]. Labels cover the answer
    " {key}." only (`loss_on='answer'`), or every next token of prompt and answer (`'all'`).

    Two curricula, both counted in micro-batches: over the first `key_ramp`, the largest key grows log-uniformly
    from 9 (one digit) to `key_range`'s maximum; over the `length_ramp` after the first `length_start`, the
    length range moves linearly from `lengths` to `lengths_end` (the retrieval is learned on short prompts first).
    """

    def __init__(self, tokenizer: Tokenizer, lengths: tuple[int, int], batch_size: int, seed: int,
                 loss_on: str = "answer", haystack: str = "repeat", key_range: tuple[int, int] = KEY_RANGE,
                 key_ramp: int = 0, lengths_end: tuple[int, int] | None = None, length_ramp: int = 0,
                 length_start: int = 0):
        self.tokenizer, self.lengths, self.batch_size, self.seed = tokenizer, lengths, batch_size, seed
        self.loss_on, self.haystack, self.key_range = loss_on, haystack, key_range
        self.key_ramp, self.lengths_end, self.length_ramp = key_ramp, lengths_end or lengths, length_ramp
        self.length_start = length_start
        self.pad_id = getattr(tokenizer, "pad_id", tokenizer.eos_id)

    def keys(self, i: int) -> tuple[int, int]:
        """The key range of micro-batch i."""
        low, high = self.key_range
        start = min(max(9, low), high)
        return low, round(start * (high / start) ** ramp(i, self.key_ramp))

    def length_range(self, i: int) -> tuple[int, int]:
        """The prompt length range of micro-batch i."""
        f = ramp(i - self.length_start, self.length_ramp) if i >= self.length_start else 0.0
        return tuple(round(a + f * (b - a)) for a, b in zip(self.lengths, self.lengths_end))

    def __call__(self, i: int) -> dict[str, Tensor]:
        rng = random.Random(f"passkey-train:{self.seed}:{i}")  # str seeds hash with SHA-512: stable across runs
        length, keys = rng.randint(*self.length_range(i)), self.keys(i)
        rows, labels = [], []
        for _ in range(self.batch_size):
            s = make_sample(length, None, rng.getrandbits(62), self.tokenizer, self.haystack, keys)
            ids = s.input_ids + s.answer_ids
            p = len(s.input_ids)
            if self.loss_on == "all":
                target = ids[1:] + [-100]
            else:  # position p - 1 + j predicts answer token j
                target = [-100] * (p - 1) + s.answer_ids + [-100]
            rows.append(ids)
            labels.append(target)
        width = max(map(len, rows))  # other tokenizers may miss `length` by a few tokens: pad on the right
        return {"input_ids": torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows]),
                "labels": torch.tensor([t + [-100] * (width - len(t)) for t in labels])}


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

    def log(self, metrics: dict[str, float], step: int | None = None, to_wandb: bool = True) -> None:
        self._run.log(metrics, self._shift(step), to_wandb)

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        self._run.log_image(key, path, self._shift(step))

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None,
                  save: bool = True) -> None:
        self._run.log_table(key, columns, rows, self._shift(step), save)

    def truncate_metrics(self, after_step: int, rows: int | None = None) -> None:
        self._run.truncate_metrics(self._shift(after_step), rows)


def run_task(cfg: DictConfig, run: Run) -> dict:
    t = cfg.task
    log_setting(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg)
    check_config(t, tokenizer)
    tcfg = train_config(cfg)
    depths = depth_grid(t)
    key_range = _int_pair(t, "key_range", 1, 99999)
    model.to(run.device)
    if tcfg.compile and not is_distributed():  # the streamed evaluation runs compiled too (2x at 1M tokens)
        model.compile_blocks()

    def grid(m: SegmentTransformer, lengths: Sequence[int], names: dict[str, float], n: int, progress: bool):
        with gathered(m) as whole, autocast(run.device, tcfg.precision):  # under FSDP: a whole replica
            whole.eval()
            return evaluate_grid(whole, tokenizer, lengths, names, n, t.seed, t.haystack, key_range,
                                 t.eval_batch, progress)

    steps = 0 if t.zero_shot else tcfg.steps
    warmup = t.local_warmup_steps if steps else 0  # trainer.steps=0 or zero_shot: evaluation only, no warm-up
    logged = _StepOffset(run, warmup)  # the main phase logs its steps after the warm-up's

    def validate(m: SegmentTransformer, step: int) -> dict[str, float]:
        """A quick look during training: the needle at the start of the shortest evaluation length."""
        rows, _ = grid(m, [min(t.lengths)], {"start": 0.0}, t.val_samples, progress=False)
        log_gates(m, logged, step)
        return {f"passkey/val_acc@{rows[0]['length_label']}/start": rows[0]["acc"]}

    summary: dict[str, float] = {}
    lengths = _int_pair(t, "train_lengths", 1)
    lengths_end = _int_pair(t, "train_lengths_end", 1) if t.get("train_lengths_end") is not None else None
    # The curricula count steps; the batches count micro-batches. Each phase ramps the keys from its own start.
    key_ramp, length_ramp = t.get("key_ramp_steps", 0) * tcfg.grad_accum, t.get("length_ramp_steps", 0) * tcfg.grad_accum
    length_start = t.get("length_ramp_start", 0) * tcfg.grad_accum
    if warmup and is_distributed():
        raise ConfigError("task.local_warmup_steps", f"{warmup}: the warm-up runs in a single process; set 0 under "
                          "torchrun")
    main = Checkpointer.of_run(run.out_dir)
    main.recover()  # a swap a crash interrupted: before looking for it
    if warmup and not (tcfg.resume and main.exists()):  # else the main phase has it
        local_cfg = dataclasses.replace(model.cfg, segment_len=t.local_warmup_segment_len)
        local = SegmentTransformer(local_cfg).to(run.device)
        local.load_state_dict(model.state_dict())
        batches = PasskeyBatches(tokenizer, lengths, tcfg.batch_size, tcfg.seed + 1_000_003, t.loss_on,
                                 t.train_haystack, key_range, key_ramp)
        # A constant learning rate after the ramp: the copy must be learned by the end of the warm-up.
        train(local, dataclasses.replace(tcfg, steps=warmup, schedule="constant", eval_every=warmup + 1), batches,
              run, Checkpointer.of_run(run.out_dir, "warmup"))
        model.load_state_dict(local.state_dict())
    if steps:
        batches = PasskeyBatches(tokenizer, lengths, tcfg.batch_size, tcfg.seed, t.loss_on, t.train_haystack,
                                 key_range, key_ramp, lengths_end, length_ramp, length_start)
        summary = train(model, tcfg, batches, logged, main, eval_fn=validate)
    if warmup or steps:
        export_weights(model, run)  # for model.init_from

    rows, outcomes = grid(model, list(t.lengths), depths, eval_count(t), progress=tcfg.progress)
    overall = summarise(outcomes)
    results: dict = {**_flat(rows, overall), "passkey/acc": overall["acc"], "passkey/exact": overall["exact"]}
    outcome_lengths = _cell_lengths(rows)
    for length in dict.fromkeys(outcome_lengths):  # what the memory carried, length by length
        at = summarise([o for o, n in zip(outcomes, outcome_lengths) if n == length])
        if at["n_earlier"]:
            results[f"passkey/acc_earlier@{length_label(length)}"] = at["acc_earlier"]
            results[f"passkey/exact_earlier@{length_label(length)}"] = at["exact_earlier"]
    if len(tokenizer.encode("0123456789")) == 10:  # one token per digit: the blind guess is well defined
        results["passkey/chance"] = chance_accuracy(key_range)
    distance = by_distance(outcomes)
    results["passkey/by_segments_back"] = distance
    steps += warmup
    results.update({"train/steps": steps, "train/loss": summary.get("train/loss"), "passkey/grid": rows,
                    **footprint_results(model.cfg, max(t.lengths))})
    run.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=steps)

    columns = ["length", "depth", "depth_value", "n", "acc", "exact", "segments_back", "n_earlier", "acc_earlier",
               "n_same", "acc_same"]
    run.log_table("passkey/grid", columns, [[r[c] for c in columns] for r in rows])
    mode = "zero-shot" if not steps else f"{steps} training steps"
    title = f"passkey token accuracy, memory={cfg.memory.name}, {mode}"
    run.log_image("passkey/heatmap", grid_heatmap(rows, Path(run.out_dir) / "passkey_heatmap.png", title), step=steps)
    if run.is_main:
        plot = distance_plot(distance, Path(run.out_dir) / "passkey_by_distance.png",
                             f"passkey by distance, memory={cfg.memory.name}, {mode}", results.get("passkey/chance"))
        run.log_image("passkey/by_distance", plot, step=steps)
    log_gates(model, run, steps)
    return results

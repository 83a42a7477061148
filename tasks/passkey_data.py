"""Passkey prompts, their scoring and the fine-tuning batches: a key hidden in a haystack, the question at the end.

Samples are pure functions of their seed, so every run and every memory sees the same prompts.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from infini_bench.data import corpus_dir
from infini_bench.tokenizer import Tokenizer

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


class Outcome(NamedTuple):
    """How one sample went, and where its needle sat relative to the question."""

    token_acc: float
    exact: bool
    generated: str
    segments_back: int  # segment where the last key digit is predicted minus that of the key's last token; 0 = same


def segments_back(sample: PasskeySample, segment_len: int) -> int:
    """How many segments before the last key digit is predicted the key's last token sits. 0: local attention can
    see the key for every digit, so the sample tests local attention, not the memory (docs/PAPER_NOTES.md, pitfall
    6). The answer follows the prompt: answer token j is predicted at position len(input_ids) - 1 + j, and when the
    prompt ends just before a segment boundary (a prompt a few tokens short of a multiple of N) the later digits
    are predicted in the next segment, where only the memory holds the key."""
    last = max(j for j, scored in enumerate(sample.scored) if scored)
    return (len(sample.input_ids) - 1 + last) // segment_len - (sample.key_end - 1) // segment_len


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


def by_distance(outcomes: Sequence[Outcome]) -> list[dict]:
    """Token accuracy and exact match by how many segments separate the key from the question, in bins 0, 1,
    2-3, 4-7, ... (powers of two); empty bins are left out (the figures draw them as gaps)."""
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

"""Book summarisation (paper Table 4, Figure 4): fine-tune on truncated book + summary, then generate a summary
from inputs of growing length and score it with ROUGE against every reference of the book (max).

Data (`task.source`):
- `synthetic` (the default, offline): generated books whose reference summary depends on facts spread over
  the whole text. Paragraphs of the embedded Gutenberg novels serve as filler; `n_events` one-sentence events
  of named characters ("Dagny buried the brass bell under the bridge.") are inserted, one in each of
  `n_events` equal slices of the book, and the summary lists them in order. Held-out novels fill the
  evaluation books. A check of the pipeline, not a reproduction of BookSum's numbers.
- `hub`: BookSum's book level (`abertsch/booksum-fullbooks`; one row per book and summary source). Each row is
  a training example; a book is scored against all its summaries, taking the max (SCROLLS, Unlimiformer).

Truncation (`task.truncate`) keeps the beginning of the book (`head`, the default), its end (`tail`), or half
of each (`head_tail`). A book shorter than the input length is used whole.
"""
from __future__ import annotations

import bisect
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from infini_bench.data import load_documents
from infini_bench.distributed import gathered
from infini_bench.errors import ConfigError, check_choice, check_positive
from infini_bench.evaluate import streamed_nll
from infini_bench.generate import generate
from infini_bench.hub import prepare_hub
from infini_bench.metrics import rouge, rouge_scorer
from infini_bench.model import SegmentTransformer
from infini_bench.paper import length_label
from infini_bench.plots import line_plot
from infini_bench.tracking import write_json
from infini_bench.train import TrainConfig, autocast
from tasks.common import footprint_results, no_batches
from tasks.runner import Task, eval_count, train_config

SOURCES = ("synthetic", "hub")
TRUNCATIONS = ("head", "tail", "head_tail")
HUB_DATASET = "abertsch/booksum-fullbooks"

NAMES = ("Ysolde", "Bertrand", "Corvin", "Dagny", "Elowen", "Fenwick", "Gisela", "Hollis", "Ingrid", "Jasper",
         "Katya", "Lorcan")
VERBS = ("found", "lost", "buried", "sold", "painted", "stole", "mended", "hid")
OBJECTS = ("a silver key", "the old map", "a red lantern", "a wooden box", "the sealed letter", "the brass bell",
           "a green coat", "the iron ring")
PLACES = ("in the mill", "by the river", "at the chapel", "under the bridge", "in the cellar", "on the hill",
          "at the harbour", "behind the inn")


@dataclass(frozen=True)
class Book:
    """A book and every reference summary it is scored against."""

    bid: str
    title: str
    text: str
    references: tuple[str, ...]
    events: tuple[str, ...] = ()  # synthetic books: the event sentences, in book order (the oracle's facts)


def truncate(ids: Sequence[int], n: int, mode: str) -> list[int]:
    """At most n tokens of a book: its beginning, its end, or the first and last halves of n."""
    ids = list(ids)
    if len(ids) <= n:
        return ids
    if mode == "head":
        return ids[:n]
    if mode == "tail":
        return ids[len(ids) - n:]
    return ids[: n - n // 2] + ids[len(ids) - n // 2:]


# --- the synthetic books --------------------------------------------------------------------------------------

def _paragraphs(split: str) -> list[list[str]]:
    """Paragraphs of each embedded novel of a split, whitespace collapsed (the files have CRLF line ends)."""
    docs = load_documents("embedded_pg19", split)
    out = []
    for doc in docs:
        paras = [" ".join(p.split()) for p in doc.text.split("\n\n")]
        out.append([p for p in paras if len(p) >= 40])
    return out


def random_event(rng: random.Random) -> str:
    """One event sentence: a name, a verb, an object and a place, each drawn from its list."""
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."


def make_book(rng: random.Random, novels: list[list[str]], n_chars: int, n_events: int, bid: str) -> Book:
    """A synthetic book: n_chars characters of filler (to a word) and one event in each of n_events equal slices."""
    paras = novels[rng.randrange(len(novels))]
    i, filler, size = rng.randrange(len(paras)), [], 0
    while size < n_chars:
        filler.append(paras[i % len(paras)])
        size += len(filler[-1]) + 2
        i += 1
    text = "\n\n".join(filler)
    text = text[: text.rfind(" ", 0, n_chars + 1) if len(text) > n_chars else None].rstrip()  # end on a word
    events = [random_event(rng) for _ in range(n_events)]
    sentence_starts = [m.end() for m in re.finditer(r"(?<=[.!?\"'])\s+(?=\S)", text)]
    parts, prev = [], 0
    for e, event in enumerate(events):  # event e goes at a sentence start inside slice e of the filler
        lo, hi = e * len(text) // n_events, (e + 1) * len(text) // n_events
        inside = sentence_starts[bisect.bisect_left(sentence_starts, lo): bisect.bisect_left(sentence_starts, hi)]
        if inside:
            at = rng.choice(inside)
        else:  # no sentence starts in this slice: any word boundary will do
            space = text.find(" ", rng.randrange(lo, hi))
            at = len(text) if space < 0 else space + 1
        parts += [text[prev:at].rstrip(), event]
        prev = at
    parts.append(text[prev:])
    return Book(bid, f"Synthetic book {bid}", "\n\n".join(p for p in parts if p), (" ".join(events),),
                tuple(events))


def synthetic_books(split: str, count: int, n_chars: int, n_events: int, seed: int) -> list[Book]:
    """`count` books of a split, each a pure function of (seed, split, index); filler from that split's novels."""
    novels = _paragraphs(split)
    return [make_book(random.Random(f"{seed}/{split}/{i}"), novels, n_chars, n_events, f"{split}-{i}")
            for i in range(count)]


# --- the oracle: what a perfect memory could score -------------------------------------------------------------

def event_spans(tokenizer, text: str, events: Sequence[str]) -> list[tuple[int, int]]:
    """Token span [start, end) of each event (in book order) in tokenizer.encode(text): the token counts of the
    text before the event and through its end. Exact for bytes; for a subword tokenizer the events are
    paragraphs of their own (after a blank line), so the token boundaries fall at their edges."""
    spans, pos = [], 0
    for event in events:
        at = text.index(event, pos)
        pos = at + len(event)
        spans.append((len(tokenizer.encode(text[:at])), len(tokenizer.encode(text[:pos]))))
    return spans


def events_read(n_tokens: int, spans: Sequence[tuple[int, int]], n: int, mode: str,
                window: int) -> tuple[list[int], list[int]]:
    """Indices of the events wholly inside the input of n tokens truncated by `mode` (the same `truncate` as the
    model's input), and of those also inside its last `window` tokens (the local window when the summary
    prompt follows)."""
    kept = truncate(range(n_tokens), n, mode)  # book positions of the input's tokens, increasing
    inside, local = [], []
    for e, (a, b) in enumerate(spans):
        k = bisect.bisect_left(kept, a)
        if b > a and k + b - a - 1 < len(kept) and kept[k] == a and kept[k + b - a - 1] == b - 1:  # contiguous
            inside.append(e)
            if k >= len(kept) - window:
                local.append(e)
    return inside, local


def oracle(tokenizer, books: Sequence[Book], lengths: Sequence[int], mode: str, window: int) -> dict[int, dict]:
    """Per input length: ROUGE of the memory oracle (every event the input holds, joined as the reference is),
    of the local oracle (the events in the last `window` tokens only), and the mean fraction of each book's
    events that are in the input, and in it but beyond the local window. Needs books with `events` (synthetic)."""
    spans = [(len(tokenizer.encode(b.text)), event_spans(tokenizer, b.text, b.events)) for b in books]
    refs = [list(b.references) for b in books]
    out = {}
    for n in lengths:
        memory, local, beyond, read = [], [], [], []
        for b, (n_tokens, sp) in zip(books, spans):
            inside, near = events_read(n_tokens, sp, n, mode, window)
            memory.append(" ".join(b.events[e] for e in inside))
            local.append(" ".join(b.events[e] for e in near))
            beyond.append((len(inside) - len(near)) / len(b.events))
            read.append(len(inside) / len(b.events))
        out[n] = {"memory": rouge(memory, refs), "local": rouge(local, refs),
                  "events_beyond_window": sum(beyond) / len(beyond), "events_in_input": sum(read) / len(read)}
    return out


def events_recalled(prediction: str, events: Sequence[str]) -> float:
    """The share of a book's events that a summary states word for word, each as a sentence of its own (an event
    stated twice in the book must be stated twice). ROUGE also rewards a summary for the names, verbs and places
    it shares with the reference by chance; this counts only the events themselves."""
    stated = Counter(s.strip() for s in re.findall(r"[^.]*\.", prediction))
    wanted = Counter(events)
    return sum(min(n, stated[e]) for e, n in wanted.items()) / max(len(events), 1)


def share_recalled(predictions: Sequence[str], books: Sequence[Book]) -> float:
    """`events_recalled` of each book's summary, averaged over the books."""
    return sum(events_recalled(p, b.events) for p, b in zip(predictions, books, strict=True)) / len(books)


def guess(books: Sequence[Book], seed: int) -> dict[str, float]:
    """ROUGE of summaries that list as many events as each reference, each drawn from the events' vocabulary (the
    template and its words, without reading the book): what a model scores without any memory of the book."""
    rng = random.Random(f"{seed}/guess")
    preds = [" ".join(random_event(rng) for _ in b.events) for b in books]
    return rouge(preds, [list(b.references) for b in books])


# --- BookSum from the hub --------------------------------------------------------------------------------------

def group_by_book(rows) -> list[Book]:
    """Rows of (bid, title, book, summary), one per summary source -> one Book per bid with all its summaries."""
    books: dict[str, dict] = {}
    for row in rows:
        entry = books.setdefault(str(row["bid"]), {"title": row["title"], "text": row["book"], "refs": []})
        entry["refs"].append(row["summary"])
    return [Book(bid, e["title"], e["text"], tuple(e["refs"])) for bid, e in books.items()]


def hub_rows(split: str, data_files: str | list[str] | None = None) -> list[dict]:
    """All rows of a BookSum book-level split from the hub (or `data_files`, local parquet copies of it); a
    one-line ConfigError when it can't be reached."""
    try:
        from datasets import load_dataset

        if data_files is not None:
            ds = load_dataset("parquet", data_files=data_files, split="train")
        else:
            prepare_hub()  # offline (cached files only) at once if the hub can't be reached
            ds = load_dataset(HUB_DATASET, split=split)
        return [{k: row[k] for k in ("bid", "title", "book", "summary")} for row in ds]
    except Exception as err:  # offline, gated, renamed: one line for the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError("task.source", f"'hub' ({HUB_DATASET}, split {split!r}) is unavailable ({reason}); "
                          f"use task.source=synthetic to run offline") from None


# --- training examples ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    book: Tensor  # (L,) truncated book tokens
    summary: Tensor  # (S,) reference tokens, capped at summary_max_tokens


def framing_tokens(tokenizer, prompt: str) -> dict:
    """What make_batch puts around each book and summary: BOS before the book, the prompt after it, EOS after the
    summary, and the padding token."""
    return {"prefix": [tokenizer.bos_id], "prompt": tokenizer.encode(prompt), "eos_id": tokenizer.eos_id,
            "pad_id": getattr(tokenizer, "pad_id", tokenizer.eos_id)}


def make_batch(examples: Sequence[Example], prefix: list[int], prompt: list[int], eos_id: int,
               pad_id: int) -> dict[str, Tensor]:
    """prefix + book + prompt + summary + EOS per row, right-padded; the loss falls on summary and EOS only."""
    before = torch.tensor(prefix, dtype=torch.long), torch.tensor(prompt, dtype=torch.long)
    seqs, starts = [], []
    for ex in examples:
        seqs.append(torch.cat([before[0], ex.book, before[1], ex.summary, torch.tensor([eos_id])]))
        starts.append(len(seqs[-1]) - len(ex.summary) - 1)  # index of the first summary token
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, start) in enumerate(zip(seqs, starts)):
        ids[r, : len(s)] = s
        target[r, start: len(s)] = True
    labels = ids[:, 1:].masked_fill(~target[:, 1:], -100)  # labels[t] = token t + 1, if it is a summary token
    return {"input_ids": ids[:, :-1], "labels": labels}


class BatchFn:
    """Micro-batch i: batch_size examples drawn with a generator seeded by (seed, i), so resume is exact. With `cut`,
    each drawn example is made by cut(index of the example, that generator) instead (`CutAtRandom`)."""

    def __init__(self, examples: Sequence, batch_size: int, seed: int, cut: Callable | None = None, **tokens):
        self.examples, self.batch_size, self.seed, self.cut, self.tokens = examples, batch_size, seed, cut, tokens

    def __call__(self, index: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pick = torch.randint(0, len(self.examples), (self.batch_size,), generator=g).tolist()
        rows = [self.cut(i, g) for i in pick] if self.cut is not None else [self.examples[i] for i in pick]
        return make_batch(rows, **self.tokens)


class CutAtRandom:
    """Synthetic training books cut at a random length: book i of `books`, cut (by `mode`) to a length drawn
    uniformly from [low, high], with a summary that lists the events wholly inside the cut, in order (what the
    memory oracle lists). So the model learns to summarise what it has read at every length, as the evaluation asks
    of it, not only a whole book (`task.synthetic.train_cut_min`)."""

    def __init__(self, books: Sequence[Book], tokenizer, low: int, high: int, mode: str, summary_max_tokens: int):
        self.books = [(tokenizer.encode(b.text), event_spans(tokenizer, b.text, b.events), b.events) for b in books]
        self.encode, self.low, self.high, self.mode = tokenizer.encode, low, high, mode
        self.summary_max_tokens = summary_max_tokens

    def __len__(self) -> int:
        return len(self.books)

    def __call__(self, i: int, g: torch.Generator) -> Example:
        ids, spans, events = self.books[i]
        n = int(torch.randint(self.low, self.high + 1, (1,), generator=g))
        inside, _ = events_read(len(ids), spans, n, self.mode, 0)
        summary = self.encode(" ".join(events[e] for e in inside)) if inside else []
        return Example(torch.tensor(truncate(ids, n, self.mode), dtype=torch.long),
                       torch.tensor(summary[: self.summary_max_tokens], dtype=torch.long))


def _examples(pairs: list[tuple[str, str]], tokenizer, t: DictConfig) -> list[Example]:
    return [Example(torch.tensor(truncate(tokenizer.encode(text), t.train_input_len, t.truncate)),
                    torch.tensor(tokenizer.encode(summary)[: t.summary_max_tokens], dtype=torch.long))
            for text, summary in pairs]


# --- the task -------------------------------------------------------------------------------------------------

def _check(t: DictConfig) -> list[int]:
    check_choice("task.source", t.source, SOURCES)
    check_choice("task.truncate", t.truncate, TRUNCATIONS)
    check_choice("task.eval_split", t.eval_split, ("validation", "test"))
    for key in ("train_input_len", "summary_max_tokens", "max_new_tokens", "eval_books"):
        check_positive(f"task.{key}", t[key])
    if not 0 < t.top_p <= 1:
        raise ConfigError("task.top_p", f"{t.top_p!r} must be in (0, 1]")
    if not t.greedy:
        check_positive("task.temperature", t.temperature)
    lens = list(t.eval_input_lens) if OmegaConf.is_list(t.eval_input_lens) else [t.eval_input_lens]
    if not lens or any(not isinstance(n, int) or n <= 0 for n in lens):
        raise ConfigError("task.eval_input_lens", f"{lens!r} must be a non-empty list of positive token counts")
    if t.source == "synthetic":
        for key in ("train_books", "book_chars", "n_events"):
            check_positive(f"task.synthetic.{key}", t.synthetic[key])
    cut = t.synthetic.get("train_cut_min")
    if cut is not None:
        if t.source != "synthetic":
            raise ConfigError("task.synthetic.train_cut_min", "cuts synthetic books only (their events are known); "
                              "set it to null with task.source=hub")
        if not isinstance(cut, int) or not 0 < cut <= t.train_input_len:
            raise ConfigError("task.synthetic.train_cut_min", f"{cut!r} must be a token count in "
                              f"[1, task.train_input_len={t.train_input_len}], or null")
    return sorted(set(lens))


def _load(t: DictConfig, eval_split: str, train: bool = True) -> tuple[list[Book], list[Book]]:
    """The training books (none unless `train`; from the hub, one per row and summary) and the evaluation books."""
    n_books = eval_count(t)
    if t.source == "hub":
        train_books = [Book(str(r["bid"]), r["title"], r["book"], (r["summary"],)) for r in hub_rows("train")] \
            if train else []
        return train_books, group_by_book(hub_rows(eval_split))[:n_books]
    s = t.synthetic
    train_books = synthetic_books("train", s.train_books, s.book_chars, s.n_events, s.seed) if train else []
    return train_books, synthetic_books(eval_split, n_books, s.book_chars, s.n_events, s.seed)


def summary_loss(model, examples: list[Example], tokens: dict, device: torch.device, precision: str) -> float:
    """Mean cross-entropy of the reference summary tokens given the truncated book (teacher forcing), streamed
    one segment at a time: memory stays flat at 32K tokens and beyond."""
    model.eval()
    total, count = 0.0, 0
    for ex in examples:
        batch = make_batch([ex], **tokens)
        for nll, n in streamed_nll(model, batch["input_ids"].to(device), batch["labels"].to(device), precision):
            total, count = total + nll, count + n
    return total / max(count, 1)


def summarise_books(model: SegmentTransformer, tokenizer, books, lengths: list[int], tokens: dict, t: DictConfig,
                    device: torch.device, tcfg) -> tuple[dict[int, list[str]], dict[int, list[int]]]:
    """Figure 4: one summary per book and input length, and the input tokens used; the same sampling seed per
    book at every length. Truncating to the longest input first, then to each length, equals one truncation
    (tests check it). With greedy decoding no seed matters, so the books whose inputs have the same length are
    decoded as one batch (the same summaries as one at a time; tests check it)."""
    book_ids = [truncate(tokenizer.encode(b.text), lengths[-1], t.truncate) for b in books]
    per_length: dict[int, list[str]] = {n: [""] * len(books) for n in lengths}
    used: dict[int, list[int]] = {n: [] for n in lengths}
    bar = tqdm(total=len(lengths) * len(books), desc="summarise", disable=not tcfg.progress)
    for n in lengths:
        kept = [truncate(ids, n, t.truncate) for ids in book_ids]
        used[n] = [len(k) for k in kept]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(kept):  # sampling: one book a batch, each with its own seed
            groups.setdefault(len(k) if t.greedy else -1 - i, []).append(i)
        for rows in groups.values():
            prompt = torch.tensor([tokens["prefix"] + kept[i] + tokens["prompt"] for i in rows], device=device)
            with autocast(device, tcfg.precision):
                out = generate(model, prompt, t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                               greedy=t.greedy, eos_id=tokenizer.eos_id, seed=t.seed + rows[0])
            for i, new in zip(rows, out.tokens):
                per_length[n][i] = tokenizer.decode(new).strip()
            bar.update(len(rows))
    bar.close()
    return per_length, used


class BookSum(Task):
    """Fine-tune on truncated book + summary; summarise each evaluation book at every input length."""

    def check(self) -> None:
        self.lengths = _check(self.t)

    def setup(self) -> TrainConfig:
        t, tokenizer = self.t, self.tokenizer
        tcfg = train_config(self.cfg)
        rouge_scorer()  # the evaluation's ROUGE: a missing package stops the run here, not after training
        train_books, self.eval_books = _load(t, t.eval_split, train=tcfg.steps > 0)  # steps=0: evaluation only
        self.tokens = framing_tokens(tokenizer, t.prompt)
        cut = t.synthetic.get("train_cut_min") if t.source == "synthetic" else None
        self.cut = CutAtRandom(train_books, tokenizer, cut, t.train_input_len, t.truncate, t.summary_max_tokens) \
            if cut is not None and train_books else None
        self.train_examples = self.cut if self.cut is not None else \
            _examples([(b.text, b.references[0]) for b in train_books], tokenizer, t)
        self.val_examples = _examples([(b.text, b.references[0]) for b in self.eval_books], tokenizer, t)
        return tcfg

    def batches(self) -> Callable[[int], dict]:
        tcfg = self.tcfg
        return BatchFn(self.train_examples, tcfg.batch_size, tcfg.seed, cut=self.cut, **self.tokens) \
            if tcfg.steps else no_batches

    def validate(self, model: SegmentTransformer) -> dict[str, float]:
        return {"val/summary_loss": summary_loss(model, self.val_examples, self.tokens, self.run.device,
                                                 self.tcfg.precision)}

    def evaluate(self, model: SegmentTransformer, summary: dict) -> dict:
        t, tcfg, lengths, books = self.t, self.tcfg, self.lengths, self.eval_books
        with gathered(model) as whole:  # under FSDP, decoding needs the whole model on every rank
            whole.eval()
            self.per_length, used = summarise_books(whole, self.tokenizer, books, lengths, self.tokens, t,
                                                    self.run.device, tcfg)
            val_loss = summary_loss(whole, self.val_examples, self.tokens, self.run.device, tcfg.precision)
        refs = [list(b.references) for b in books]
        self.scores = scores = {n: rouge(self.per_length[n], refs) for n in lengths}
        main = lengths[-1]  # the paper's Table 4 is scored at its longest input, 500K
        results: dict = {f"booksum/{k}": v for k, v in scores[main].items()}
        results["booksum/input_len"] = main
        results.update(footprint_results(model.cfg, main))
        for n in lengths:
            results.update({f"booksum/{k}@{length_label(n)}": v for k, v in scores[n].items()})  # R-L, overall
            results[f"booksum/input_tokens@{length_label(n)}"] = sum(used[n]) / len(used[n])
        # The oracle (synthetic books only: it needs the events): what a perfect memory / local attention alone
        # could score at each length, with the same truncation and scorer.
        self.oracle = oracle(self.tokenizer, books, lengths, t.truncate, model.cfg.segment_len) \
            if books and all(b.events for b in books) else {}
        for n, o in self.oracle.items():
            results[f"booksum/oracle_memory/overall@{length_label(n)}"] = o["memory"]["overall"]
            results[f"booksum/oracle_local/overall@{length_label(n)}"] = o["local"]["overall"]
            results[f"booksum/events_beyond_window@{length_label(n)}"] = o["events_beyond_window"]
            results[f"booksum/events_in_input@{length_label(n)}"] = o["events_in_input"]
            results[f"booksum/events_recalled@{length_label(n)}"] = share_recalled(self.per_length[n], books)
        if self.oracle:
            results["booksum/guess/overall"] = guess(books, t.synthetic.seed)["overall"]
        results.update({"val/summary_loss": val_loss,
                        "train/loss": summary.get("train/loss"), "train/steps": self.final_step, "data/source": t.source,
                        "booksum/books": len(books)})
        return results

    def artefacts(self, results: dict) -> None:
        """The predictions beside their references, the length sweep as a plot, and both as W&B tables."""
        run, lengths, scores, per_length, books = self.run, self.lengths, self.scores, self.per_length, self.eval_books
        memory, out_dir = self.cfg.memory.name, Path(run.out_dir)
        write_json(out_dir / "booksum_predictions.json", {
            "metrics": results,
            "length_sweep": [{"input_len": n, **scores[n], **({
                "oracle_memory": self.oracle[n]["memory"], "oracle_local": self.oracle[n]["local"],
                "events_beyond_window": self.oracle[n]["events_beyond_window"],
                "events_in_input": self.oracle[n]["events_in_input"],
                "events_recalled": results[f"booksum/events_recalled@{length_label(n)}"]} if n in self.oracle else {})}
                for n in lengths],
            "books": [{"bid": b.bid, "title": b.title, "references": list(b.references),
                       "predictions": {str(n): per_length[n][i] for n in lengths}} for i, b in enumerate(books)],
        })
        plot = line_plot({memory: [scores[n]["overall"] for n in lengths]}, out_dir / "booksum_length_sweep.png",
                         "input length (tokens)", "overall ROUGE (geometric mean of R-1, R-2, R-L)",
                         "Summary quality against input length (paper Figure 4)", x=lengths, logx=True,
                         ymin=0, memories={memory: memory}, references={
                             "oracle: perfect memory": [self.oracle[n]["memory"]["overall"] for n in lengths],
                             "oracle: local attention alone": [self.oracle[n]["local"]["overall"] for n in lengths],
                             "guess: random events, no reading": [results["booksum/guess/overall"]] * len(lengths),
                         } if self.oracle else None)
        run.log_image("booksum/length_sweep", plot, step=self.final_step)
        # Tables last: W&B steps them past the final step, and it drops anything logged at an earlier step afterwards.
        run.log_table("booksum/samples", ["bid", "title", "input_len", "prediction", "reference"],
                      [[b.bid, b.title, n, per_length[n][i], b.references[0]]
                       for i, b in enumerate(books[: self.t.sample_rows]) for n in lengths])
        run.log_table("booksum/length_sweep_table", ["input_len", "rouge1", "rouge2", "rougeL", "overall"],
                      [[n, scores[n]["rouge1"], scores[n]["rouge2"], scores[n]["rougeL"], scores[n]["overall"]]
                       for n in lengths])


TASK = BookSum

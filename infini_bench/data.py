"""Long documents for language modelling: the embedded offline corpus, or PG19 / proof-pile from the hub.

The embedded corpus ships in `infini_bench/corpus/` (public-domain Project Gutenberg books and two LaTeX
mathematics textbooks) and is split by book, so held-out text is never seen in training:

| corpus | train | validation | test |
|---|---|---|---|
| `embedded_pg19` | 7 novels | pg16 (Peter Pan) | pg11 (Alice in Wonderland) |
| `embedded_math` | Hardy, A Course of Pure Mathematics | Whitehead, first half | Whitehead, second half |

Whitehead's book is the only held-out math text, so it is cut in two at the paragraph nearest its middle.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from infini_bench.code_corpus import code_documents
from infini_bench.documents import SPLITS, Document
from infini_bench.errors import ConfigError, check_choice
from infini_bench.hub import prepare_hub

EMBEDDED = ("embedded_pg19", "embedded_math", "embedded")
CODE = ("python_code",)  # built at run time from this environment's Python source: infini_bench/code_corpus.py
HUB = {"pg19": "emozilla/pg19", "arxiv_math": "hoskinson-center/proof-pile", "c4": "allenai/c4"}
_PG_HELD_OUT = {"validation": ["pg16"], "test": ["pg11"]}


def corpus_dir() -> Path:
    """Where the embedded books, math LaTeX and BookSum metadata live inside the package."""
    return Path(__file__).parent / "corpus"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


@lru_cache(maxsize=None)
def embedded_documents(corpus: str, split: str) -> tuple[Document, ...]:
    """Documents of one split of the embedded corpus ('embedded' = books and math together)."""
    if corpus == "embedded":
        return embedded_documents("embedded_pg19", split) + embedded_documents("embedded_math", split)
    if corpus == "embedded_pg19":
        books = sorted((corpus_dir() / "pg_books").glob("pg*.txt"), key=lambda p: int(p.stem[2:]))
        held_out = {name for names in _PG_HELD_OUT.values() for name in names}
        chosen = [p for p in books if (p.stem in _PG_HELD_OUT[split] if split != "train" else p.stem not in held_out)]
        return tuple(Document(p.stem, _read(p)) for p in chosen)
    math = corpus_dir() / "math_latex"
    if split == "train":
        return (Document("hardy", _read(math / "38769-t.tex")),)
    text = _read(math / "41568-t.tex")
    cut = text.find("\n\n", len(text) // 2)
    return (Document(f"whitehead-{split}", text[:cut] if split == "validation" else text[cut:]),)


def is_arxiv(row: dict) -> bool:
    """Whether a proof-pile row is from its arXiv part. Its build script writes `meta` as a JSON object,
    {"config": "arxiv", "file": ...}: a dict once `datasets` has loaded it (whose str() quotes with '), or the
    JSON text where a loader keeps it as a string."""
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return False
    return isinstance(meta, dict) and meta.get("config") == "arxiv"


def hub_rows(name: str, split: str, data_files: str | list[str] | None = None):
    """Rows of a hub data set, streamed, as dicts with a "text" field. `data_files`: local files of the same
    shape as the hub's (parquet for PG19, jsonl.gz for proof-pile and C4) read instead, e.g. a mirror."""
    from datasets import load_dataset

    if data_files is None:
        prepare_hub()  # offline (cached files only) at once if the hub can't be reached
    if name == "pg19":  # a parquet copy; deepmind/pg19 is script-based and no longer loads
        if data_files is not None:
            return load_dataset("parquet", data_files=data_files, split="train", streaming=True)
        return load_dataset(HUB[name], split=split, streaming=True)
    if name == "c4":  # English C4; its held-out split is called validation, and it has no test split
        if data_files is not None:
            return load_dataset("json", data_files=data_files, split="train", streaming=True)
        return load_dataset(HUB[name], "en", split="validation" if split == "test" else split, streaming=True)
    # proof-pile is script-based: read its json files directly, keep the arXiv part
    folder = {"train": "train", "validation": "dev", "test": "test"}[split]
    files = data_files if data_files is not None else f"hf://datasets/{HUB[name]}/{folder}/*.jsonl.gz"
    rows = load_dataset("json", data_files=files, split="train", streaming=True)
    return (r for r in rows if is_arxiv(r))


def hub_documents(name: str, split: str, max_docs: int, min_bytes: int = 0,
                  data_files: str | list[str] | None = None) -> tuple[Document, ...]:
    """The first `max_docs` documents of at least `min_bytes` UTF-8 bytes of a hub data set, streamed (needs
    network access to the hub, unless `data_files` names local copies). Short documents are skipped while
    streaming: a token covers at least one byte, so a document under n bytes can't reach n tokens."""
    docs = []
    try:
        with tqdm(desc=f"{name} {split}", unit=" docs", leave=False, dynamic_ncols=True, delay=2,
                  disable=None) as bar:  # a terminal only: a pipe or a log gets no transient bar
            for i, row in enumerate(hub_rows(name, split, data_files)):
                bar.update(1)
                if len(docs) >= max_docs:
                    break
                if len(row["text"].encode("utf-8")) >= min_bytes:
                    docs.append(Document(str(row.get("short_book_title") or row.get("url") or i), row["text"]))
                    bar.set_postfix(kept=len(docs))
    except Exception as err:  # offline, missing, renamed: one line for the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError("task.dataset", f"{name!r} ({HUB[name]}) is unavailable ({reason}); "
                          "task.fallback_offline=true falls back to the embedded stand-in, and "
                          "task.dataset=embedded_pg19 or embedded_math runs offline") from None
    if not docs:
        raise ConfigError("task.dataset", f"{name!r} split {split!r} returned no documents")
    return tuple(docs)


def load_documents(dataset: str, split: str, max_docs: int = 1000, min_bytes: int = 0,
                   code: dict | None = None) -> tuple[Document, ...]:
    """Documents by data set name: one of the embedded corpora, the Python code corpus (built with the options
    in `code`) or a hub data set (`min_bytes` prefilters only the hub's streams; the embedded documents are all
    long)."""
    if split not in SPLITS:
        raise ConfigError("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    if dataset in EMBEDDED:
        return embedded_documents(dataset, split)
    if dataset in HUB:
        return hub_documents(dataset, split, max_docs, min_bytes)
    if dataset in CODE:
        return code_documents(split, **(code or {}))
    raise ConfigError("task.dataset", f"{dataset!r} is not one of {', '.join(EMBEDDED + CODE + tuple(HUB))}")


WINDOW_STARTS = ("any", "document")


class TokenStream:
    """Tokenized training documents, sampled as fixed-length windows that depend only on (seed, index).

    Because window i is a pure function of i, a resumed run sees exactly the batches it would have seen.
    With `min_doc_tokens` = 0 the documents are packed end to end (an EOS between them) and a window may
    span two; with `min_doc_tokens` > 0 (the paper's continual pre-training: documents longer than 4K)
    documents shorter than that, or than one window, are dropped and every window lies inside one document.
    `window_start` "document" (with `min_doc_tokens` > 0) starts every window at a document's first token, so a
    window's first segment is a document's first segment, as in evaluation; "any" starts it anywhere.
    """

    def __init__(self, docs: Sequence[Document], tokenizer, seq_len: int, batch_size: int, seed: int,
                 min_doc_tokens: int = 0, window_start: str = "any"):
        within_docs = min_doc_tokens > 0
        shortest = max(min_doc_tokens, seq_len + 1) if within_docs else 0
        pieces = []
        with tqdm(total=len(docs), desc="tokenize", unit=" docs", leave=False, dynamic_ncols=True, delay=2,
                  disable=None) as bar:  # a terminal only, as above
            for start in range(0, len(docs), 64):  # batches: a Hugging Face tokenizer encodes them in parallel
                batch = [d.text for d in docs[start: start + 64]]
                for ids in tokenizer.encode_batch(batch):
                    ids = list(ids) + ([] if within_docs else [tokenizer.eos_id])
                    if len(ids) >= shortest:
                        pieces.append(torch.tensor(ids, dtype=torch.int32))  # int32: half the RAM of int64
                bar.update(len(batch))
        if not pieces:
            raise ConfigError("task.min_doc_tokens", f"{min_doc_tokens} drops all {len(docs)} training documents")
        self._setup(torch.cat(pieces), torch.tensor([len(p) for p in pieces]), within_docs, seq_len, batch_size,
                    seed, window_start)
        self.n_dropped = len(docs) - len(pieces)

    @classmethod
    def from_state(cls, state: dict[str, Tensor | bool | int], seq_len: int, batch_size: int, seed: int,
                   window_start: str = "any"):
        """The stream `state()` saved: tokenized once, then reused by other ranks and by a resumed run."""
        stream = cls.__new__(cls)
        stream._setup(state["tokens"], state["lengths"], bool(state["within_docs"]), seq_len, batch_size, seed,
                      window_start)
        stream.n_dropped = int(state["n_dropped"])
        return stream

    def state(self) -> dict[str, Tensor | bool | int]:
        return {"tokens": self.tokens, "lengths": self.lengths, "within_docs": self.within_docs,
                "n_dropped": self.n_dropped}

    def _setup(self, tokens: Tensor, lengths: Tensor, within_docs: bool, seq_len: int, batch_size: int, seed: int,
               window_start: str = "any"):
        check_choice("task.window_start", window_start, WINDOW_STARTS)
        if window_start == "document" and not within_docs:
            raise ConfigError("task.window_start", "document needs task.min_doc_tokens > 0 (packed text has no "
                              "document starts); e.g. task.min_doc_tokens=1")
        self.tokens, self.lengths, self.within_docs = tokens, lengths, within_docs
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_docs = len(lengths)
        if not within_docs and len(tokens) <= seq_len + 1:
            raise ConfigError("task.seq_len", f"{seq_len} does not fit the training text ({len(tokens)} tokens)")
        if within_docs and int(lengths.min()) <= seq_len:
            raise ConfigError("task.seq_len", f"{seq_len} is longer than a training document")
        # Valid window starts: document d offers lengths[d] - seq_len of them, from its first token on; packed
        # text is one long document whose last token only ever appears as a label.
        if not within_docs:
            lengths = torch.tensor([len(tokens) - 1])
        self._starts_per_doc, self._first = lengths - seq_len, torch.cumsum(lengths, 0) - lengths
        if window_start == "document":  # one start per document: its first token
            self._starts_per_doc = torch.ones_like(lengths)
        self._cum = torch.cumsum(self._starts_per_doc, 0)

    def windows(self, n: int, g: torch.Generator) -> Tensor:
        """n windows of seq_len + 1 tokens, every valid start equally likely."""
        flat = torch.randint(0, int(self._cum[-1]), (n,), generator=g)
        doc = torch.searchsorted(self._cum, flat, right=True)
        starts = self._first[doc] + flat - (self._cum[doc] - self._starts_per_doc[doc])
        return torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()]).long()

    def __call__(self, index: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        w = self.windows(self.batch_size, g)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}


class MixtureStream:
    """Training windows from several sources: each row of a batch picks its source with probability
    proportional to `weights`, then a window of it. Like TokenStream, batch i depends only on (seed, i)."""

    def __init__(self, streams: dict[str, TokenStream], weights: dict[str, float], batch_size: int, seed: int):
        if sorted(streams) != sorted(weights):
            raise ValueError(f"streams {sorted(streams)} and weights {sorted(weights)} name different sources")
        self.names = sorted(streams)
        self.streams, self.weights, self.batch_size, self.seed = streams, dict(weights), batch_size, seed
        self.probs = torch.tensor([float(weights[n]) for n in self.names], dtype=torch.float64)
        self.probs = self.probs / self.probs.sum()

    def _draw(self, index: int) -> tuple[torch.Generator, list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return g, torch.multinomial(self.probs, self.batch_size, True, generator=g).tolist()

    def sources(self, index: int) -> list[str]:
        """Which source each row of batch `index` comes from."""
        return [self.names[i] for i in self._draw(index)[1]]

    def __call__(self, index: int) -> dict[str, Tensor]:
        g, picks = self._draw(index)
        w = torch.cat([self.streams[self.names[i]].windows(1, g) for i in picks])
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

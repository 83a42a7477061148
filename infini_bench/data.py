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

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from infini_bench.errors import ConfigError

SPLITS = ("train", "validation", "test")
EMBEDDED = ("embedded_pg19", "embedded_math", "embedded")
HUB = {"pg19": "emozilla/pg19", "arxiv_math": "hoskinson-center/proof-pile"}
_PG_HELD_OUT = {"validation": ["pg16"], "test": ["pg11"]}


def corpus_dir() -> Path:
    """Where the embedded books, math LaTeX and BookSum metadata live inside the package."""
    return Path(__file__).parent / "corpus"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


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


def hub_documents(name: str, split: str, max_docs: int) -> tuple[Document, ...]:
    """The first `max_docs` documents of a hub data set, streamed (needs network access to the hub)."""
    try:
        from datasets import load_dataset

        if name == "pg19":  # a parquet copy; deepmind/pg19 is script-based and no longer loads
            rows = load_dataset(HUB[name], split=split, streaming=True)
        else:  # proof-pile is script-based: read its json files directly, keep the arXiv part
            folder = {"train": "train", "validation": "dev", "test": "test"}[split]
            files = f"hf://datasets/{HUB[name]}/{folder}/*.jsonl.gz"
            rows = (r for r in load_dataset("json", data_files=files, split="train", streaming=True)
                    if '"arxiv"' in str(r.get("meta", "")))
        docs = []
        for i, row in enumerate(rows):
            if i >= max_docs:
                break
            docs.append(Document(str(row.get("short_book_title") or i), row["text"]))
    except Exception as err:  # offline, missing, renamed: one line for the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError("task.dataset", f"{name!r} ({HUB[name]}) is unavailable ({reason}); use "
                          f"task.dataset=embedded_pg19 or embedded_math to run offline") from None
    if not docs:
        raise ConfigError("task.dataset", f"{name!r} split {split!r} returned no documents")
    return tuple(docs)


def load_documents(dataset: str, split: str, max_docs: int = 1000) -> tuple[Document, ...]:
    """Documents by data set name: one of the embedded corpora or a hub data set."""
    if split not in SPLITS:
        raise ConfigError("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    if dataset in EMBEDDED:
        return embedded_documents(dataset, split)
    if dataset in HUB:
        return hub_documents(dataset, split, max_docs)
    raise ConfigError("task.dataset", f"{dataset!r} is not one of {', '.join(EMBEDDED + tuple(HUB))}")


class TokenStream:
    """Tokenized training documents, sampled as fixed-length windows that depend only on (seed, index).

    Because window i is a pure function of i, a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, docs: tuple[Document, ...], tokenizer, seq_len: int, batch_size: int, seed: int):
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.eos = tokenizer.eos_id
        tokens = []
        for d in docs:
            tokens.extend(tokenizer.encode(d.text))
            tokens.append(tokenizer.eos_id)
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        if len(self.tokens) <= seq_len + 1:
            raise ConfigError("task.seq_len", f"{seq_len} does not fit the training text ({len(self.tokens)} tokens)")

    def __call__(self, index: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g)
        windows = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

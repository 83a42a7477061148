"""What every corpus is made of (the embedded books, the hub data sets, the Python code corpus): named documents
in three splits."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def documents_digest(docs: Sequence[Document]) -> str:
    """SHA-256 of documents' names and texts, in order."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.name.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
    return h.hexdigest()

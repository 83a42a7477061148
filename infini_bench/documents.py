"""What every corpus is made of (the embedded books, the hub data sets, the Python code corpus): named documents
in three splits."""
from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    name: str
    text: str

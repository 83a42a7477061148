"""Tokenizers behind one small interface: byte-level (the default, nothing to download) or any HF tokenizer."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str:
        """What decides the ids it gives, for keys of cached tokens."""
        ...


class ByteTokenizer:
    """UTF-8 bytes 0-255, then BOS = 256, EOS = 257, PAD = 258."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


class HFTokenizer:
    """A Hugging Face tokenizer by hub name or local path (never with trust_remote_code)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        from infini_bench.hub import prepare_hub

        if not Path(name).expanduser().is_dir():  # a hub name: offline at once if the hub can't be reached
            prepare_hub()
        self.name = name
        self._tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once, on all cores (the Rust tokenizer's threads); no warning for long ones."""
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's definition (the fast tokenizer's JSON, else its vocabulary) and EOS id."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(self._tok.get_vocab().items()))
        return hashlib.sha256(f"{spec}\0eos={self.eos_id}".encode()).hexdigest()


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'byte' or a Hugging Face tokenizer name / directory."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)

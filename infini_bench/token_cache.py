"""Tokenized training data, stored once in a folder that runs share instead of once per run folder.

An entry is one data set's `TokenStream.state()` (tokens, document lengths, ...) under a key: a dict saying
everything that decides those tokens (the documents or which ones a hub data set streams, the tokenizer, the
documents kept). The file name is a hash of the key; the file holds the key and a SHA-256 of the tokens, both
checked on every load, so a corrupt, truncated or foreign file is never trained on. Entries are written to a
temporary file and renamed into place: runs that write the same entry at once leave one whole file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from infini_bench.errors import ResourceError

log = logging.getLogger(__name__)


def state_digest(state: dict[str, Tensor | bool | int]) -> str:
    """SHA-256 of a TokenStream state: its token and length tensors (dtype, shape and bytes) and its flags."""
    h = hashlib.sha256()
    for name in ("tokens", "lengths"):
        tensor = state[name].contiguous()
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        h.update(tensor.numpy())
    h.update(f"within_docs={bool(state['within_docs'])} n_dropped={int(state['n_dropped'])}".encode())
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


class Entry(NamedTuple):
    state: dict[str, Tensor | bool | int]
    sha256: str
    path: Path


class TokenCache:
    """Token streams by key, in `root` (created on the first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key: dict) -> Path:
        """<data set>-<hash of the key>.pt: readable enough to tell entries apart, unique per key."""
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("dataset", "tokens")))[:40]
        return self.root / f"{readable}-{hashlib.sha256(_text(key).encode()).hexdigest()[:24]}.pt"

    def load(self, key: dict, sha256: str | None = None) -> Entry | None:
        """The entry stored under `key`, checked; None when there is none, or (with a warning) when its file is
        unreadable, holds another key, fails its checksum or, given `sha256`, holds other tokens."""
        path = self.path(key)
        if not path.exists():
            return None
        try:  # mmap: the ranks of a run, and runs side by side, share one copy in RAM
            stored = torch.load(path, weights_only=True, mmap=True)
            state, why = stored["state"], None
            if stored["key"] != _text(key):
                why = "it holds another key"
            elif state_digest(state) != stored["sha256"]:
                why = "its tokens do not match their SHA-256"
            elif sha256 is not None and stored["sha256"] != sha256:
                why = f"it holds other tokens than the {sha256[:12]} asked for"
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
            why = f"it is unreadable: {_first_line(err)}"
        if why is not None:
            log.warning("token cache: %s is not used (%s)", path, why)
            return None
        return Entry(state, stored["sha256"], path)

    def save(self, key: dict, state: dict[str, Tensor | bool | int]) -> Entry:
        """Store `state` under `key`, atomically: a temporary file of this process, renamed into place."""
        path = self.path(key)
        digest = state_digest(state)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            torch.save({"key": _text(key), "sha256": digest, "state": state}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # a full disk: torch's writer raises RuntimeError
            tmp.unlink(missing_ok=True)
            raise ResourceError(f"{path} could not be written ({_first_line(err)}); free disk space there or "
                                "point cache_dir at another folder") from None
        return Entry(state, digest, path)


def _text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)

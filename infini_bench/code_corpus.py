"""A long-document corpus with no download: the Python source of the environment the harness runs in.

One document per top-level package (or top-level module) found in the standard library and the site-packages
directories on `sys.path`: the package's `.py` files in path order, each preceded by a `# path: <pkg>/<file>`
line. Held-out packages are chosen by a fixed hash of the package name (SHA-256, not Python's salted `hash`):
the name's hash as a fraction u in [0, 1) puts the package in validation when u < held_out, in test when
held_out <= u < 2 held_out, and in training otherwise, so no held-out file is ever trained on.

Environments differ, so every build carries a manifest (packages, their versions where known, bytes, files, a
SHA-256 of the corpus): the same environment gives the same bytes and the same digest. `max_bytes` caps the
corpus: each held-out split gets `held_out * max_bytes` of it and training the rest, filled with whole packages
taken in hash order (the last one cut at a file, or a line, boundary), so a small cap is a fixed sample of
packages rather than the first letters of the alphabet.

`train_documents="file"` makes every file of a training package its own document (its `# path:` line first),
for training windows that start at a document's start: a package gives one such window, a file one each. The
held-out splits stay one document per package, so evaluation is the same either way.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from infini_bench.documents import SPLITS, Document
from infini_bench.errors import ConfigError

DATASET = "python_code"
HEADER = "# path: {path}\n"
TRAIN_DOCUMENTS = ("package", "file")


def default_roots() -> tuple[str, ...]:
    """The standard library and the site-packages (or dist-packages) directories on sys.path, in its order.

    The script's own folder and editable installs are left out: the corpus is the environment, not this repo.
    """
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    roots = []
    for entry in sys.path:
        real = os.path.realpath(entry or ".")
        if os.path.isdir(real) and real not in roots and (
                real == stdlib or os.path.basename(real) in ("site-packages", "dist-packages")):
            roots.append(real)
    return tuple(roots)


def name_fraction(name: str) -> float:
    """The package name's fixed hash as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(name: str, held_out: float) -> str:
    """Which split a package belongs to, by the hash of its name alone."""
    u = name_fraction(name)
    return "validation" if u < held_out else "test" if u < 2 * held_out else "train"


def _py_files(path: Path) -> list[Path]:
    """The .py files of a package folder in path order (symlinks are not followed; no __pycache__)."""
    files = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def discover(roots: tuple[str, ...]) -> dict[str, tuple[Path, list[Path]]]:
    """Top-level package name -> (root, its .py files). A name found in two roots is taken from the first, as
    `import` would; names that are not identifiers (dist-info folders, site-packages inside the stdlib) and
    editable-install finders are skipped."""
    found: dict[str, tuple[Path, list[Path]]] = {}
    for root in map(Path, roots):
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            name = entry.name[:-3] if entry.name.endswith(".py") and entry.is_file() else entry.name
            if name in found or not name.isidentifier() or name.startswith("__editable__"):
                continue
            if entry.is_file() and entry.name.endswith(".py"):
                found[name] = (root, [entry])
            elif entry.is_dir() and not entry.is_symlink():
                files = _py_files(entry)
                if files:
                    found[name] = (root, files)
    return found


def _versions() -> dict[str, str]:
    """Installed distributions' versions by top-level package name (several distributions: joined by ', ')."""
    out = {}
    for top, dists in metadata.packages_distributions().items():
        versions = []
        for dist in sorted(set(dists)):
            try:
                versions.append(f"{dist} {metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                continue
        if versions:
            out[top] = ", ".join(versions)
    return out


def _read(path: Path) -> bytes:
    """A source file as UTF-8 bytes with \\n line ends (undecodable bytes become U+FFFD)."""
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").encode("utf-8")


@dataclass
class _Package:
    name: str
    split: str
    version: str | None
    files: int = 0
    parts: list[bytes] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(map(len, self.parts))


def _fill(root: Path, files: list[Path], budget: int | None, package: _Package) -> int:
    """Append the package's files to `package` until `budget` bytes are used; returns the bytes added."""
    used = 0
    for path in files:
        piece = HEADER.format(path=path.relative_to(root).as_posix()).encode("utf-8") + _read(path)
        if not piece.endswith(b"\n"):
            piece += b"\n"
        if budget is not None and used + len(piece) > budget:
            cut = piece.rfind(b"\n", 0, budget - used) + 1  # a line boundary is a character boundary
            if cut > 0:
                package.parts.append(piece[:cut])
                package.files += 1
                used += cut
            break
        package.parts.append(piece)
        package.files += 1
        used += len(piece)
    return used


@dataclass(frozen=True)
class CodeCorpus:
    """Documents per split and the manifest that says what they are."""

    documents: dict[str, tuple[Document, ...]]
    file_lengths: dict[str, tuple[tuple[int, ...], ...]]  # per split, per document: its files' lengths in characters
    manifest: dict
    available_bytes: int  # .py bytes on disk in every discovered package: what an uncapped build could use


@lru_cache(maxsize=8)
def build(roots: tuple[str, ...] | None = None, max_bytes: int | None = None, held_out: float = 0.05) -> CodeCorpus:
    """The corpus of the packages under `roots` (default: `default_roots()`), capped at `max_bytes`."""
    roots = default_roots() if roots is None else tuple(os.path.realpath(r) for r in roots)
    for r in roots:
        if not os.path.isdir(r):
            raise ConfigError("task.code_roots", f"{r!r} is not a folder")
    if not 0.0 < held_out < 0.5:
        raise ConfigError("task.held_out", f"{held_out!r} must be a fraction in (0, 0.5)")
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0):
        raise ConfigError("task.max_bytes", f"{max_bytes!r} must be null or a positive integer")
    found = discover(roots)
    available = sum(p.stat().st_size for _, files in found.values() for p in files)
    versions = _versions()
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    python = sys.version.split()[0]
    budgets = {s: None if max_bytes is None else int(max_bytes * (held_out if s != "train" else 1 - 2 * held_out))
               for s in SPLITS}
    chosen: dict[str, list[_Package]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    for name in sorted(found, key=lambda n: (name_fraction(n), n)):  # hash order: a fixed sample under a cap
        split = split_of(name, held_out)
        budget = budgets[split]
        if budget is not None and used[split] >= budget:
            continue
        root, files = found[name]
        version = versions.get(name) or (f"python {python} stdlib" if str(root) == stdlib else None)
        package = _Package(name, split, version)
        used[split] += _fill(root, files, None if budget is None else budget - used[split], package)
        if package.parts:
            chosen[split].append(package)

    digest, by_split, documents, file_lengths = hashlib.sha256(), {}, {}, {}
    for split in SPLITS:
        split_digest = hashlib.sha256()
        for p in chosen[split]:
            for h in (digest, split_digest):
                h.update(p.name.encode("utf-8") + b"\0")
                for part in p.parts:
                    h.update(part)
                h.update(b"\0")
        by_split[split] = split_digest.hexdigest()
        documents[split] = tuple(Document(p.name, b"".join(p.parts).decode("utf-8")) for p in chosen[split])
        file_lengths[split] = tuple(tuple(len(part.decode("utf-8")) for part in p.parts) for p in chosen[split])
    manifest = {
        "dataset": DATASET, "python": python, "roots": list(roots), "held_out": held_out, "max_bytes": max_bytes,
        "sha256": digest.hexdigest(), "sha256_by_split": by_split,
        "bytes": {s: sum(p.size for p in chosen[s]) for s in SPLITS},
        "packages": [{"name": p.name, "split": p.split, "version": p.version, "bytes": p.size, "files": p.files}
                     for s in SPLITS for p in chosen[s]],
    }
    return CodeCorpus(documents, file_lengths, manifest, available)


def code_documents(split: str, roots: tuple[str, ...] | None = None, max_bytes: int | None = None,
                   held_out: float = 0.05, min_bytes: int = 1, train_documents: str = "package"
                   ) -> tuple[Document, ...]:
    """One split of the corpus, its training split as packages or files (`train_documents`); a clear error when
    it holds fewer than `min_bytes` bytes."""
    if train_documents not in TRAIN_DOCUMENTS:
        raise ConfigError("task.train_documents", f"{train_documents!r} is not one of {', '.join(TRAIN_DOCUMENTS)}")
    corpus = build(roots, max_bytes, held_out)
    docs = corpus.documents[split]
    if split == "train" and train_documents == "file":
        docs = tuple(_files(docs, corpus.file_lengths[split]))
    have = corpus.manifest["bytes"][split]
    if have < min_bytes:
        capped = max_bytes is not None and corpus.available_bytes > max_bytes
        key = "task.max_bytes" if capped else "task.code_roots"
        where = ", ".join(corpus.manifest["roots"]) or "no folder"
        fix = "raise task.max_bytes" if capped else "point task.code_roots at folders with more Python packages"
        raise ConfigError(key, f"the {split} split of python_code has {have} bytes in {len(docs)} packages "
                               f"(from {where}), fewer than the {min_bytes} it needs; {fix}")
    return docs


def _files(packages: tuple[Document, ...], lengths: tuple[tuple[int, ...], ...]):
    """Each package's files as documents of their own, named `<package>/<file index>`."""
    for package, sizes in zip(packages, lengths):
        start = 0
        for i, size in enumerate(sizes):
            yield Document(f"{package.name}/{i}", package.text[start: start + size])
            start += size


def code_manifest(roots: tuple[str, ...] | None = None, max_bytes: int | None = None,
                  held_out: float = 0.05) -> dict:
    """The manifest of a build (cached: the documents are not read twice)."""
    return build(roots, max_bytes, held_out).manifest

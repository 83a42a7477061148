"""task.dataset=python_code: the environment's Python source as long documents, split by package-name hash."""
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from infini_bench import code_corpus
from infini_bench.data import load_documents
from infini_bench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hashed(name: str) -> float:
    """The split hash, computed again here: the first 8 bytes of SHA-256 as a fraction of 2^64."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2 ** 64


def make_source(root: Path, n: int, size: int = 400) -> list[str]:
    """n packages of two files each, `size` bytes of source per file; returns their names."""
    names = []
    for i in range(n):
        name = f"pkg{i:02d}"
        (root / name / "sub").mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"# {name}\n" + f"x_{i} = {i}\n" * (size // 10))
        (root / name / "sub" / "mod.py").write_text(f"def f_{i}():\n    return {i}\n" * (size // 30))
        names.append(name)
    return names


@pytest.fixture(autouse=True)
def fresh_cache():
    code_corpus.build.cache_clear()
    yield
    code_corpus.build.cache_clear()


def test_a_document_is_its_packages_files_in_path_order_and_the_manifest_says_so(tmp_path):
    (tmp_path / "alpha" / "b").mkdir(parents=True)
    (tmp_path / "alpha" / "__pycache__").mkdir()
    (tmp_path / "alpha" / "__init__.py").write_text("A = 1\r\n")
    (tmp_path / "alpha" / "b" / "z.py").write_text("Z = 2")
    (tmp_path / "alpha" / "a.py").write_text("import os\n")
    (tmp_path / "alpha" / "__pycache__" / "junk.py").write_text("never read\n")
    (tmp_path / "alpha" / "notes.txt").write_text("not python\n")
    (tmp_path / "beta.py").write_text("B = 3\n")
    (tmp_path / "gamma-1.0.dist-info").mkdir()
    (tmp_path / "gamma-1.0.dist-info" / "x.py").write_text("skipped: not a package name\n")
    (tmp_path / "torch").mkdir()  # named like an installed distribution: its version is looked up
    (tmp_path / "torch" / "__init__.py").write_text("T = 4\n")
    corpus = code_corpus.build((str(tmp_path),), held_out=0.01)
    docs = {d.name: d.text for split in corpus.documents.values() for d in split}
    assert docs == {
        "alpha": "# path: alpha/__init__.py\nA = 1\n# path: alpha/a.py\nimport os\n# path: alpha/b/z.py\nZ = 2\n",
        "beta": "# path: beta.py\nB = 3\n",
        "torch": "# path: torch/__init__.py\nT = 4\n",
    }
    m = corpus.manifest
    rows = {p["name"]: p for p in m["packages"]}
    assert {n: (r["files"], r["bytes"]) for n, r in rows.items()} == {
        n: (text.count("# path: "), len(text.encode())) for n, text in docs.items()}
    assert rows["torch"]["version"] == f"torch {metadata.version('torch')}" and rows["beta"]["version"] is None
    assert m["roots"] == [str(tmp_path.resolve())] and m["python"] == sys.version.split()[0]
    assert sum(m["bytes"].values()) == sum(len(t.encode()) for t in docs.values())


def test_splits_follow_the_name_hash_are_disjoint_and_rebuild_to_the_same_digest(tmp_path):
    names = make_source(tmp_path, 24)
    held_out = 0.2
    first = code_corpus.build((str(tmp_path),), held_out=held_out)
    by_split = {s: [d.name for d in docs] for s, docs in first.documents.items()}
    expected = {"validation": {n for n in names if hashed(n) < held_out},
                "test": {n for n in names if held_out <= hashed(n) < 2 * held_out}}
    expected["train"] = set(names) - expected["validation"] - expected["test"]
    assert {s: set(v) for s, v in by_split.items()} == expected
    assert expected["validation"] and expected["test"]  # the 24 names do land in every split
    assert sum(map(len, by_split.values())) == len(names)
    # The digest over (name, text) in split order, recomputed from the documents.
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        for d in first.documents[split]:
            digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    assert first.manifest["sha256"] == digest.hexdigest()
    code_corpus.build.cache_clear()
    again = code_corpus.build((str(tmp_path),), held_out=held_out)
    assert again is not first and again.manifest == first.manifest and again.documents == first.documents


def test_max_bytes_caps_each_split_with_whole_lines_in_hash_order(tmp_path):
    make_source(tmp_path, 24)
    held_out, cap = 0.2, 3000
    whole = code_corpus.build((str(tmp_path),), held_out=held_out)
    capped = code_corpus.build((str(tmp_path),), max_bytes=cap, held_out=held_out)
    budgets = {"train": cap * (1 - 2 * held_out), "validation": cap * held_out, "test": cap * held_out}
    for split, docs in capped.documents.items():
        size = sum(len(d.text.encode()) for d in docs)
        assert 0 < size <= budgets[split] and size == capped.manifest["bytes"][split]
        full = {d.name: d.text for d in whole.documents[split]}
        order = [d.name for d in whole.documents[split]]
        assert [d.name for d in docs] == order[: len(docs)]  # a prefix of the hash order
        for d in docs[:-1]:
            assert d.text == full[d.name]
        assert full[docs[-1].name].startswith(docs[-1].text) and docs[-1].text.endswith("\n")
    assert order == sorted(order, key=hashed)


def test_a_source_too_small_for_the_split_is_one_clear_error(tmp_path):
    make_source(tmp_path, 2, size=100)
    with pytest.raises(ConfigError, match=r"^task.code_roots: the train split of python_code has \d+ bytes"):
        load_documents("python_code", "train", code={"roots": (str(tmp_path),), "min_bytes": 100_000})
    with pytest.raises(ConfigError, match=r"^task.max_bytes: the train split .* raise task.max_bytes"):
        load_documents("python_code", "train", code={"roots": (str(tmp_path),), "max_bytes": 200, "min_bytes": 190})
    with pytest.raises(ConfigError, match="^task.code_roots: '.*nowhere' is not a folder"):
        load_documents("python_code", "train", code={"roots": (str(tmp_path / "nowhere"),)})


def test_train_documents_file_makes_each_training_file_a_document_and_leaves_the_held_out_packages(tmp_path):
    make_source(tmp_path, 24)
    roots = (str(tmp_path),)
    code = {"roots": roots, "held_out": 0.2, "max_bytes": 12_000}  # the last training package cut inside a file
    packages = load_documents("python_code", "train", code=code)
    files = load_documents("python_code", "train", code={**code, "train_documents": "file"})
    assert len(files) > len(packages)
    for package in packages:
        own = [d for d in files if d.name.rpartition("/")[0] == package.name]
        assert "".join(d.text for d in own) == package.text  # the same text, cut at the files
        assert all(d.text.startswith("# path: ") and d.text.count("# path: ") == 1 for d in own)
    for split in ("validation", "test"):
        assert load_documents("python_code", split, code={**code, "train_documents": "file"}) == \
            load_documents("python_code", split, code=code)
    with pytest.raises(ConfigError, match="^task.train_documents: 'files' is not one of package, file"):
        load_documents("python_code", "train", code={**code, "train_documents": "files"})


def test_the_environment_itself_builds_the_same_slice_twice():
    roots = code_corpus.default_roots()
    assert any(Path(r).name in ("site-packages", "dist-packages") for r in roots)
    assert str(ROOT) not in roots  # the repo is not part of the environment
    first = code_corpus.build(max_bytes=400_000)
    code_corpus.build.cache_clear()
    again = code_corpus.build(max_bytes=400_000)
    assert first.manifest["sha256"] == again.manifest["sha256"] and first.documents == again.documents
    assert 0 < sum(first.manifest["bytes"].values()) <= 400_000 and first.available_bytes > 400_000
    assert all(first.documents[s] for s in ("train", "validation", "test"))


def test_lm_task_trains_on_python_code_and_records_the_manifest(tmp_path):
    make_source(tmp_path / "src", 24, size=2000)
    out = tmp_path / "run"
    args = ["task=lm", "task.dataset=python_code", f"task.code_roots=[{tmp_path / 'src'}]", "task.held_out=0.2",
            "task.seq_len=128", "trainer.steps=3", "trainer.batch_size=2", "trainer.eval_every=100",
            "task.eval_max_docs=2", "task.eval_max_tokens=256", "trainer.progress=false", "logger=none"]
    proc = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())["results"]
    manifest = r["data/manifest"]
    assert manifest["sha256"] == code_corpus.build((str(tmp_path / "src"),), held_out=0.2).manifest["sha256"]
    assert {p["split"] for p in manifest["packages"]} == {"train", "validation", "test"}
    assert r["train/steps"] == 3 and 1 < r["val/ppl"] < 259 and len(r["val/loss_by_segment"]) == 4
    small = subprocess.run([sys.executable, "run.py", *args, "task.max_bytes=200", f"hydra.run.dir={out}-small"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=ENV)
    lines = small.stderr.strip().splitlines()
    assert small.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: task.max_bytes: the "), small.stderr
    assert not Path(f"{out}-small").exists()


def infini_bench_imports(module: str) -> set[str]:
    """The infini_bench modules a module imports anywhere in its source, imports inside functions too."""
    import ast

    path = ROOT / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found.update(n for n in names if n.startswith("infini_bench."))
    return found


def test_the_code_corpus_and_the_data_module_do_not_import_each_other():
    reached, todo = set(), ["infini_bench.code_corpus"]
    while todo:  # everything code_corpus imports, directly or through another module
        for name in infini_bench_imports(todo.pop()) - reached:
            reached.add(name)
            todo.append(name)
    assert "infini_bench.data" not in reached and "infini_bench.documents" in reached
    assert "infini_bench.code_corpus" in infini_bench_imports("infini_bench.data")

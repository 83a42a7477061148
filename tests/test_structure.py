"""The package's shape: no import cycle among its modules, counting imports made inside functions too (a lazy
import that dodges a cycle at load time still ties the two modules together), and one owner of the checkpoint
files, infini_bench.checkpoint, which run.py, the trainer and the tasks call."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infini_bench", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports anywhere in its file (at the top or inside a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module itself.
            subs = {f"{base}.{alias.name}" for alias in node.names} & known
            out |= subs or {base}
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "infini_bench.model" in graph["infini_bench.generate"]
    assert {"infini_bench.memories.infini", "infini_bench.memories.rmt"} <= graph["infini_bench.memories"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


CHECKPOINT_FILES = ("extra.json", "checksums.json", "checkpoints/", "last.tmp", "last.old")


def touches_checkpoint_files(path: Path) -> list[str]:
    """What in a file reads or writes checkpoints directly: DCP's save and load, or a checkpoint file's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [n for n in names if n.startswith("torch.distributed.checkpoint")
                  and not n.startswith("torch.distributed.checkpoint.state_dict")]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [name for name in CHECKPOINT_FILES if name in node.value or node.value == name.strip("/")]
    return found


def test_only_the_checkpointer_touches_checkpoint_files():
    """infini_bench.checkpoint owns the checkpoint files: run.py, the trainer and the tasks go through it."""
    assert touches_checkpoint_files(ROOT / "infini_bench" / "checkpoint.py")  # the scan sees what it looks for
    files = [p for p in modules().values() if p.name != "checkpoint.py"] + [ROOT / "run.py"]
    offenders = {str(p.relative_to(ROOT)): found for p in files if (found := touches_checkpoint_files(p))}
    assert not offenders, offenders

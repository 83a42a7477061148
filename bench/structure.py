"""The code's shape, measured: the import graph of the project's modules, and the walk a reader takes when
following the composed config through one run.

    python -m bench.structure cycles                                   # an import cycle, or none
    python -m bench.structure walk task=passkey model=tiny trainer.steps=2 hydra.run.dir=/tmp/walk

The walk runs `run.py` with the given overrides under a profiler and follows the config Hydra composed: it is
the sequence of files holding the innermost function that received that config, or a part of it (`cfg.task`),
as an argument, each call site followed once (a call already followed, and everything under it, is not walked
again), so it is what a reader sees who opens every function the config is handed to, in the order the run
calls them. It reports
- stays: stretches of the walk in one file;
- returns: stays in a file the walk had already left;
- climbs: calls from a module into one that imports it, directly or not (an arrow running back up the layers).
"""
from __future__ import annotations

import argparse
import ast
import runpy
import sys
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


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ---- the walk ------------------------------------------------------------------------------------------------------


def _module_of(filename: str) -> str | None:
    """The project module a code object's file is (run.py is `run`), or None outside the project."""
    path = Path(filename)
    if not path.is_absolute() or ROOT not in path.parents:
        return None
    rel = path.relative_to(ROOT)
    if rel == Path("run.py"):
        return "run"
    return module_name(path) if rel.parts[0] in PACKAGES and path.suffix == ".py" else None


class Walk:
    """A profiler hook that records the walk (see the module's docstring) of the DictConfig that `run.py`'s `main`
    receives."""

    def __init__(self) -> None:
        self.root = None  # the composed config
        self.stack: list[tuple[object, str, bool]] = []  # (frame, module, walked) of frames holding the config
        self.edges: set[tuple[object, object]] = set()  # call sites already followed: (caller code, callee code)
        self.stays: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (caller module, callee module) of every walked call between files

    def _of_config(self, value) -> bool:
        """The composed config or a part of it (`cfg.task`, `cfg.trainer`, ...)."""
        from omegaconf import Container

        return value is self.root or (isinstance(value, Container) and value._get_root() is self.root)

    def _visit(self, module: str) -> None:
        if not self.stays or self.stays[-1] != module:
            self.stays.append(module)

    def __call__(self, frame, event: str, arg) -> None:
        if event == "call":
            module = _module_of(frame.f_code.co_filename)
            if module is None:
                return
            if self.root is None:
                if module == "run" and frame.f_code.co_name == "main":
                    from omegaconf import DictConfig

                    self.root = next((v for v in frame.f_locals.values() if isinstance(v, DictConfig)), None)
                if self.root is None:
                    return
            code = frame.f_code
            args = list(frame.f_locals.values())[: code.co_argcount + code.co_kwonlyargcount]
            received = any(self._of_config(v) for v in args)
            if not received:
                return
            caller = self.stack[-1] if self.stack else None
            walked = caller is None or caller[2]
            if walked and caller is not None:
                edge = (caller[0].f_code, code)
                walked = edge not in self.edges
                self.edges.add(edge)
            self.stack.append((frame, module, walked))
            if walked:
                if caller is not None and caller[1] != module:
                    self.calls.append((caller[1], module))
                self._visit(module)
        elif event == "return" and self.stack and self.stack[-1][0] is frame:
            self.stack.pop()
            if self.stack and self.stack[-1][2]:
                self._visit(self.stack[-1][1])

    def figures(self, graph: dict[str, set[str]]) -> dict[str, int]:
        files = set(self.stays)
        returns = len(self.stays) - len(files)
        climbs = sum(1 for a, b in self.calls if a in reaches(graph, b))
        return {"stays": len(self.stays), "files": len(files), "returns": returns, "climbs": climbs}


def walk(overrides: list[str]) -> tuple[Walk, dict[str, int]]:
    """Run `run.py` with `overrides` and walk its config; the walk and its figures."""
    tracer = Walk()
    argv, sys.argv = sys.argv, [str(ROOT / "run.py"), *overrides]
    sys.setprofile(tracer)
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    except SystemExit as err:
        if err.code not in (None, 0):
            raise
    finally:
        sys.setprofile(None)
        sys.argv = argv
    return tracer, tracer.figures(import_graph())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("cycles", help="print an import cycle among the project's modules, or 'none'")
    w = sub.add_parser("walk", help="run run.py with these overrides and walk its config")
    w.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.command == "cycles":
        cycle = find_cycle(import_graph())
        print(" -> ".join(cycle) if cycle else "none")
        return
    tracer, figures = walk(args.overrides)
    print(" -> ".join(tracer.stays))
    print(", ".join(f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

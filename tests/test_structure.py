"""The package's shape: no import cycle among its modules, counting imports made inside functions too (a lazy
import that dodges a cycle at load time still ties the two modules together), one owner of the checkpoint
files, infini_bench.checkpoint, which run.py, the trainer and the tasks call, and the walk's figures."""
import ast
from pathlib import Path

from bench.structure import ROOT, Walk, find_cycle, import_graph, modules


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "infini_bench.model" in graph["infini_bench.generate"]
    assert {"infini_bench.memories.infini", "infini_bench.memories.rmt"} <= graph["infini_bench.memories"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walks_figures_count_returns_to_a_file_and_calls_back_up_the_layers():
    walk = Walk()
    walk.stays = ["run", "tasks.lm", "infini_bench.train", "tasks.lm", "infini_bench.train", "tasks.lm"]
    walk.calls = [("run", "tasks.lm"), ("tasks.lm", "infini_bench.train"), ("infini_bench.train", "tasks.lm")]
    figures = walk.figures(import_graph())
    # tasks.lm imports infini_bench.train, so the trainer calling back into the task climbs; run -> task does not.
    assert figures == {"stays": 6, "files": 3, "returns": 3, "climbs": 1}


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


def test_the_walk_follows_the_config_and_its_parts_into_project_code_and_nothing_else():
    import sys

    from omegaconf import OmegaConf

    from tasks.runner import eval_count
    from tasks.passkey import depth_grid

    task = {"name": "passkey", "limit": None, "samples": 3, "depth_sweep": None, "depths": ["start"]}
    cfg, other = OmegaConf.create({"task": task}), OmegaConf.create({"task": task})  # the run's, and another
    walk = Walk()
    walk.root = cfg
    sys.setprofile(walk)
    try:
        found = (eval_count(cfg.task), depth_grid(other.task), depth_grid(OmegaConf.create(cfg.task)), str(cfg))
    finally:
        sys.setprofile(None)
    assert found[:3] == (3, {"start": 0.0}, {"start": 0.0})
    # A part of the config enters tasks.runner; another config, a copy and code outside the project are not walked.
    assert walk.stays == ["tasks.runner"] and walk.calls == [] and walk.stack == []

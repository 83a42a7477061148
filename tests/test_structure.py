"""The package's shape: no import cycle among its modules, counting imports made inside functions too (a lazy
import that dodges a cycle at load time still ties the two modules together); the walk's figures."""
from bench.structure import Walk, find_cycle, import_graph


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

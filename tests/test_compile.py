"""torch.compile for every registered memory, on the CPU, as `trainer.compile=true` uses it (each block
compiled in place): the compiled model computes the eager one's outputs and gradients in training, streaming
and decoding; no block breaks its graph (fullgraph=True); and training steps after the first trace nothing
new, so a per-segment or per-step recompile cannot come back unnoticed.

The backend here is Dynamo's tracer alone, which runs the captured graphs as they are: tracing is where
compile failures that depend on the torch version arise (torch 2.11 could not return a NamedTuple made by
`_replace` from a compiled block), and it is the same on every device. Inductor's kernels are the GPU smoke
check's job (scripts/gpu_smoke.py)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from infini_bench.generate import decode_step, prefill
from infini_bench.memories import memory_class, memory_names
from infini_bench.model import RECOMPILE_LIMIT, build_model

N = 8
ARGS = {"memorizing": {"knn_size": 20, "top_k": 4, "knn_layer": 2}, "rmt": {"num_mem_tokens": 3}}
# Traces after each of three training calls: one per kind of layer, all in the first call; RMT compiles a whole
# segment: the first (the learned M_0, broadcast over the batch), a later one, and a partial last one.
# Memorizing's block breaks its graph around the kNN search (below), so it is compiled in parts, and two of
# the parts first meet the other kind of layer in the second call; nothing is traced after that.
TRAIN_TRACES = {"memorizing": [7, 9, 9], "rmt": [3, 3, 3]}
# Memories whose blocks break their graph on purpose: Memorizing's kNN search runs eagerly (knn_attention is
# torch.compiler.disable'd, since inductor miscompiled its backward on the GPU), so its block is compiled in parts.
GRAPH_BREAKS = {"memorizing"}


class Traces:
    """A torch.compile backend that counts the graphs it is handed and runs each as traced."""

    def __init__(self):
        self.graphs = 0
        self.per_frame: dict[int, int] = {}  # traces of each compiled function (the limit counts per function)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        frame = torch._guards.CompileContext.current_compile_id().frame_id
        self.per_frame[frame] = self.per_frame.get(frame, 0) + 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pair(memory: str, args: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module, Traces]:
    """A tiny two-layer model and a copy with the same weights whose blocks are compiled (no graph breaks)."""
    torch.manual_seed(0)
    eager = build_model("tiny", memory=memory, memory_args=args or ARGS.get(memory), segment_len=N, n_layers=2)
    with torch.no_grad():  # gates away from 0.5 so the memory path matters
        for layer in eager.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
    compiled, traces = copy.deepcopy(eager), Traces()
    compiled.compile_blocks(backend=traces, fullgraph=memory not in GRAPH_BREAKS)
    return eager, compiled, traces


def tokens(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 259, (2, t), generator=torch.Generator().manual_seed(seed))


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.train()
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach()


@pytest.mark.parametrize("memory", memory_names())
def test_compiled_training_equals_eager(memory):
    """Forward and backward over four segments and a partial fifth: logits and every gradient."""
    eager, compiled, traces = pair(memory)
    ids = tokens(4 * N + 3)
    torch.testing.assert_close(train_step(compiled, ids), train_step(eager, ids), rtol=1e-5, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert traces.graphs > 0  # the blocks did run through the compiler


@pytest.mark.parametrize("args", [{"read_norm": "rms"}, {"products": "fp32"}, {"backprop": "detached"}],
                         ids=["read_norm", "products", "backprop"])
@pytest.mark.parametrize("memory", ["linear", "delta"])
def test_the_ablation_options_compile(memory, args):
    """Infini-attention's ablation options trace in one graph and train as they do eagerly."""
    eager, compiled, traces = pair(memory, args)
    ids = tokens(4 * N + 3)
    torch.testing.assert_close(train_step(compiled, ids), train_step(eager, ids), rtol=1e-5, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert traces.graphs > 0


@pytest.mark.parametrize("memory", memory_names())
def test_compiled_streaming_and_decoding_equal_eager(memory):
    """Segment by segment with the state carried (the streamed evaluation), then prefill and token-by-token
    decoding across a segment end."""
    eager, compiled, _ = pair(memory)
    eager.eval()
    compiled.eval()
    ids = tokens(4 * N + 3)
    with torch.no_grad():
        expected = eager(ids).logits
        streamed = torch.cat([out.logits for out in compiled.segments(ids)], dim=1)
        torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)
        last, state = prefill(compiled, ids[:, : 2 * N - 2])
        steps = [last] + [decode_step(compiled, ids[:, t], state) for t in range(2 * N - 2, 3 * N + 1)]
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 2 * N - 3: 3 * N + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", memory_names())
def test_no_recompiles_after_the_first_training_step(memory):
    """Three training steps on new tokens of the same shape: the first traces once per kind of layer, the
    others trace nothing. Streamed evaluations of four lengths (four partial last segments) then stay well
    within the compiler's limit, and a fifth of a length already seen traces nothing."""
    _, compiled, traces = pair(memory)
    counts = []
    for step in range(3):
        train_step(compiled, tokens(4 * N + 3, seed=step))
        counts.append(traces.graphs)
    assert counts == TRAIN_TRACES.get(memory, [1, 1, 1])
    compiled.eval()
    with torch.no_grad():
        for seed, length in enumerate((5 * N + 1, 6 * N + 5, 7 * N + 2, 3 * N + 7, 6 * N + 5)):
            for _ in compiled.segments(tokens(length, seed=seed)):
                pass
            counts.append(traces.graphs)
    assert counts[-1] == counts[-2]
    assert max(traces.per_frame.values()) <= RECOMPILE_LIMIT // 2


def test_a_memory_that_cannot_compile_runs_eagerly(monkeypatch):
    """compilable = False: compile_blocks warns once and leaves the blocks eager, and training still runs."""
    monkeypatch.setattr(memory_class("linear"), "compilable", False)
    model = build_model("tiny", memory="linear", segment_len=N, n_layers=1)
    traced = []
    model.layers[0].attn.register_forward_pre_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    with pytest.warns(UserWarning, match="memory=linear cannot be compiled"):
        model.compile_blocks(backend=Traces())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, tokens(2 * N))
    assert traced == [False]


def test_the_knn_search_runs_eagerly_inside_a_compiled_block(monkeypatch):
    """Inductor compiled Memorizing's kNN search and top-k attention into a wrong backward on an H200 (torch
    2.11: non-finite gradients at batch 8 x 8,192 tokens, finite eagerly), a failure no CPU backend shows; so
    knn_attention is excluded from compilation, and this holds that it stays excluded."""
    from infini_bench.memories import memorizing

    seen = []
    original = memorizing.TopKAttention.apply

    class Recording:
        @staticmethod
        def apply(*args):
            seen.append(torch.compiler.is_compiling())
            return original(*args)

    monkeypatch.setattr(memorizing, "TopKAttention", Recording)
    _, compiled, traces = pair("memorizing")
    train_step(compiled, tokens(4 * N + 3))
    assert traces.graphs > 0 and seen and not any(seen)

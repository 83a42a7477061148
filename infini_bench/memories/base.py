"""The contract every memory meets, and the registry that lists them.

A memory is what a layer's attention sees beyond the current segment. Per layer it owns a small state
(a NamedTuple of tensors, one row per batch item, `None` at a document start) and answers four questions:

- `context(state)`: extra keys and values the local attention sees before the segment (Transformer-XL's
  cache, full attention's whole past), with a validity mask; they sit at positions 0 .. M-1 and the segment
  at M .. M+N-1, so RoPE stays window-local;
- `read(q, state)`: a retrieval mixed into the local attention's output by a learned gate per head, Eq. 10
  of the Infini-attention paper (the compressive memory's Eq. 7, or a kNN top-k);
- `write(state, k, v)`: the state after a segment's un-rotated keys and values were added to it;
- `forward(...)`: a whole sequence from `state`, segment-parallel where the memory's math allows. The base
  class computes it segment by segment from the three methods above, which is also the definition the fast
  paths are tested against.

The attention they plug into (local attention with a context, the gate's mix) is `infini_bench.attention`.

Memories that change the stack rather than a layer (RMT's memory tokens) meet a second, smaller contract,
`StackMemory`: the model asks it to wrap each segment's input in rows of its own and to take its state out of
the stack's output. Such a memory names its `StackMemory` in `stack`; its per-layer part is then an ordinary
`Memory` that carries nothing and attends among the rows it is given.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from infini_bench.attention import Context, local_attention, mix
from infini_bench.errors import ConfigError, check_choice


class Footprint(NamedTuple):
    """Memory a model carries between segments (the paper's Table 1), three ways."""

    paper_floats: int  # the paper's formula (multi-head H = n_heads, as the paper counts)
    state_floats: int  # the floats of the state this implementation carries (GQA counts kv heads)
    state_bytes: int  # its bytes


class Work(NamedTuple):
    """What a memory makes a forward over t tokens from a document start compute, for the benchmark's FLOP counts
    (bench/flops.py adds the model's projections): the (query, key) pairs its local attention scores per layer and
    head, the rows each block runs, and, over all layers, the forward FLOPs of its own arithmetic, of a search done
    without gradient, and of keys and values recomputed from the detached layer input in training."""

    pairs: int
    rows: int
    memory: float = 0.0
    selection: float = 0.0
    recompute: float = 0.0


def segment_spans(t: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of each segment of n (the last one shorter) over t tokens."""
    return [(start, min(n, t - start)) for start in range(0, t, n)]


def causal_pairs(s: int, m: int = 0) -> int:
    """(query, key) pairs a bottom-right causal mask allows: s queries over m earlier keys and themselves."""
    return s * m + s * (s + 1) // 2


class Memory(nn.Module):
    """One layer's memory. Subclasses set `name`, `defaults` and override what differs from local attention."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # accepted memory_args and their defaults
    gated: ClassVar[bool] = False  # read() is mixed in by a per-head gate (Eq. 10)
    stack: ClassVar[type[StackMemory] | None] = None  # the stack-level part, for a memory that changes the stack
    capturable: ClassVar[bool] = True  # fixed-shape state: decoding can be captured as a CUDA graph
    compilable: ClassVar[bool] = True  # its blocks trace under torch.compile (tests/test_compile.py holds it)
    whole_sequence: ClassVar[bool] = False  # ignores segment_len (full attention)
    detached_input: bool = False  # forward() wants k, v recomputed from the layer's detached input (TXL)
    empty_read: str = "local"  # what the gate mixes in where nothing was read (mix(); Infini sets it per run)

    def __init__(self, cfg, layer: int, args: dict[str, Any]):
        super().__init__()
        self.cfg, self.layer, self.args = cfg, layer, args

    # ---- per-layer state -----------------------------------------------------------------------------------
    def context_len(self) -> int:
        """M: the positions the context occupies before the segment (fixed, so shapes stay static)."""
        return 0

    def context(self, state: Any) -> Context | None:
        return None

    def positions(self, t: int, state: Any) -> int:
        """How many RoPE positions a call over t tokens from `state` rotates: the context, then a segment."""
        return self.context_len() + self.cfg.segment_len

    def read(self, q: Tensor, state: Any) -> tuple[Tensor, Tensor] | None:
        """q (B, H, L, D) un-rotated -> (A_mem (B, H, L, D_v) fp32, has (B, H, 1 or L, 1) bool), or None."""
        return None

    def write(self, state: Any, k: Tensor, v: Tensor) -> Any:
        """The state after a segment: k (B, H_kv, L, D) un-rotated, v (B, H_kv, L, D_v)."""
        return state

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A fixed-shape state that reads as empty (for the CUDA-graph decoder); None where state is None."""
        return None

    def active(self) -> bool:
        """Whether this layer carries anything between segments (a memory may sit at one layer only)."""
        return True

    def search_reach(self) -> int | None:
        """For a read that is a search whose result feeds only the layers above (Memorizing's kNN layer): how many
        segments at the end of a prompt have searches that can change anything after them, so that a prefill may
        skip the earlier ones (generate.prefill). None: no such search here."""
        return None

    def reset_parameters(self) -> None:
        """Initialise the memory's own parameters (none here); also called after loading a pretrained model."""

    def local_rotary(self, rotary):
        """The position encoding of this layer's local attention: RoPE, unless the memory's layer has none."""
        return rotary

    # ---- the whole-sequence forward --------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state: Any, rotary,
                kv_detached: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        """q (B, H, T, D), k and v (B, H_kv, T, D), starting at a segment boundary -> out (B, H, T, D_v), state.

        The reference definition: one segment at a time through context(), read() and write()."""
        n = self.cfg.segment_len if not self.whole_sequence else q.shape[2]
        outs = []
        for start in range(0, q.shape[2], max(n, 1)):
            sl = slice(start, start + n)
            out = segment_attention(self, q[:, :, sl], k[:, :, sl], v[:, :, sl], gate, state, rotary)
            state = self.write(state, k[:, :, sl], v[:, :, sl])
            outs.append(out)
        return torch.cat(outs, dim=2), state

    # ---- Table 1 ---------------------------------------------------------------------------------------------
    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """No state between segments."""
        return Footprint(0, 0, 0)

    # ---- the benchmark's FLOP count --------------------------------------------------------------------------
    @classmethod
    def work(cls, cfg, args: dict[str, Any], t: int, training: bool) -> Work:
        """Causal attention inside segments of N (the whole sequence for a `whole_sequence` memory), t rows,
        no arithmetic of its own. A memory that computes more says so here, so its benchmark rows count it."""
        n = t if cls.whole_sequence else cfg.segment_len
        return Work(sum(causal_pairs(s) for _, s in segment_spans(t, n)), t)


class StackMemory(nn.Module):
    """A memory that changes the stack rather than a layer: it adds rows to every segment, runs them through every
    block with the text, and reads what it carries from the stack's output at those rows. The model calls it and
    runs the blocks; it never touches the model. Its state is one tensor, `None` at a document start.

    In training and streaming, each segment's embedded text goes through `wrap`, the blocks (whose per-layer
    memory attends among the rows as the memory wants) and the final norm, then `unwrap`. While decoding, the
    `rows` rows of `memory_rows` fill the first slots of every layer's cache before the segment's text (seeing each
    other as `rows_visible` says), and once the segment is full they run again over the whole cache: their
    final-norm output is the next state."""

    rows: int = 0  # rows before the text, in a wrapped segment and in every layer's decoding cache
    recompute: bool = False  # training recomputes each segment in the backward pass

    def __init__(self, cfg, args: dict[str, Any]):
        super().__init__()
        self.cfg, self.args = cfg, args

    def start(self, batch: int) -> Tensor:
        """The state at a document start."""
        raise NotImplementedError

    def wrap(self, x: Tensor, state: Tensor) -> Tensor:
        """A segment's embedded text x (B, L, dim) -> the rows the stack runs for it (B, L', dim)."""
        raise NotImplementedError

    def unwrap(self, h: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """The final-norm output over the wrapped rows -> the `length` text outputs and the next state."""
        raise NotImplementedError

    def carry(self, index: int, state: Tensor) -> Tensor:
        """The state segment `index` of a call hands to the next one (truncated BPTT detaches it here)."""
        return state

    def memory_rows(self, state: Tensor | None, batch: int) -> Tensor:
        """The rows a decoded segment starts and ends with (B, rows, dim)."""
        raise NotImplementedError

    def rows_visible(self, device: torch.device) -> Tensor:
        """(rows, rows) bool: which of `memory_rows` each of them sees while decoding."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise its parameters; also called after loading a pretrained model."""


def segment_attention(memory: Memory, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state: Any,
                      rotary) -> Tensor:
    """One segment (or its first L tokens) from a segment boundary: local attention with the memory's context,
    mixed with its read. q (B, H, L, D), k and v (B, H_kv, L, D) -> (B, H, L, D_v)."""
    ctx = memory.context(state) if state is not None else None
    local = local_attention(q, k, v, memory.local_rotary(rotary), ctx)
    return mix(local, memory.read(q, state) if state is not None else None, gate, memory.empty_read)


# ---- the registry ----------------------------------------------------------------------------------------------
MEMORIES: dict[str, type[Memory]] = {}
# The order of every list of memories (tables, figures, the benchmark's rows, the tests' parameters): the ablation,
# Infini-attention's two rules, the whole past, then the paper's baselines. A memory not named here follows, by name.
MEMORY_ORDER = ("none", "linear", "delta", "full", "txl", "memorizing", "rmt")


def register_memory(cls: type[Memory]) -> type[Memory]:
    """Class decorator: make a memory available as `memory=<cls.name>` everywhere."""
    MEMORIES[cls.name] = cls
    return cls


def memory_names() -> list[str]:
    """The registered memories, in MEMORY_ORDER."""
    return [m for m in MEMORY_ORDER if m in MEMORIES] + sorted(m for m in MEMORIES if m not in MEMORY_ORDER)


def memory_class(name: str) -> type[Memory]:
    check_choice("memory", name, memory_names())
    return MEMORIES[name]


def resolve_args(name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The memory's parameters: its defaults, overridden by `args`; an unknown key is a ConfigError."""
    cls = memory_class(name)
    args = dict(args or {})
    unknown = sorted(set(args) - set(cls.defaults))
    if unknown:
        accepted = ", ".join(sorted(cls.defaults)) or "none"
        raise ConfigError(f"memory.{unknown[0]}", f"is not a parameter of memory={name}; accepted: {accepted}")
    return {**cls.defaults, **args}

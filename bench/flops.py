"""FLOP and byte counts of the benchmarked work, from the model config alone: training, streamed prefill and
decoding, for every registered memory. One formula for every caller (bench/ and scripts/fsdp_bench.py), so
their MFU figures compare.

Counted: matrix products (2 FLOPs per multiply-add) and the memories' own arithmetic. Not counted: norms, RoPE,
activations, gates, the local attention's softmax, the embedding lookup. A memory's parameters come from
`cfg.memory_args` through `infini_bench.memories.resolve_args`, so the counts follow the run's config.
"""
from __future__ import annotations

import math

from torch import nn

from infini_bench.memories import memory_class, resolve_args
from infini_bench.memories.memorizing import MemorizingTransformer
from infini_bench.memories.txl import TransformerXL
from infini_bench.model import ModelConfig


def linear_params(model: nn.Module) -> int:
    """Weights every token is multiplied by: all nn.Linear weights, each counted once (tied ones too)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def segment_spans(t: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of each segment of n (the last one shorter) over t tokens."""
    return [(start, min(n, t - start)) for start in range(0, t, n)]


def causal_pairs(s: int, m: int = 0) -> int:
    """(query, key) pairs a bottom-right causal mask allows: s queries over m earlier keys and themselves."""
    return s * m + s * (s + 1) // 2


def rmt_pairs(m: int, length: int, causal: bool) -> int:
    """Pairs allowed by RMT's mask over [read (m); text (length); write (m)] (`memories.rmt.segment_mask`).

    causal: plain causal over the 2m + length rows. Else read rows see the m read keys, text rows the read keys
    and the text causally, write rows all 2m + length keys."""
    if causal:
        return causal_pairs(2 * m + length)
    return m * m + causal_pairs(length, m) + m * (2 * m + length)


def segment_len(cfg: ModelConfig, t: int) -> int:
    """The length the memory cuts t tokens into: the whole sequence for full attention."""
    return t if memory_class(cfg.memory).whole_sequence else cfg.segment_len


def attention_pairs(cfg: ModelConfig, t: int) -> int:
    """(query, key) pairs one head of one layer's local softmax attention scores over t tokens from a document
    start, exactly as the memory's mask allows.

    Segments of N (the whole sequence for `full`); a segment starting at token p has min(M, p) valid cached
    keys before it (Transformer-XL and Memorizing, M = mem_len; 0 for the others), the segment itself causal.
    RMT: each segment's 2m + L rows under its mask (`rmt_pairs`)."""
    args = resolve_args(cfg.memory, cfg.memory_args)
    spans = segment_spans(t, segment_len(cfg, t))
    if cfg.memory == "rmt":
        return sum(rmt_pairs(args["num_mem_tokens"], s, args["causal"]) for _, s in spans)
    m = TransformerXL.resolve_mem_len(cfg, args) if issubclass(memory_class(cfg.memory), TransformerXL) else 0
    return sum(causal_pairs(s, min(m, p)) for p, s in spans)


def attention_flops(cfg: ModelConfig, t: int) -> float:
    """Forward FLOPs of the local softmax attention over t tokens, all heads and layers: QK^T and PV are 2 d
    each per allowed (query, key) pair (`attention_pairs`)."""
    return cfg.n_layers * cfg.n_heads * attention_pairs(cfg, t) * 4 * cfg.head_dim


def compressive_flops(cfg: ModelConfig, rule: str, t: int, n: int) -> float:
    """Forward FLOPs of the compressive memory over t tokens from an empty memory.

    Write (Eq. 8) 2 t d d_v H_kv; z update t d H_kv; read (Eq. 7, numerator and denominator) 2 (t - n) d
    (d_v + 1) H, since the first segment has nothing to read; the delta rule (Eq. 9) reads once more per key.
    """
    if t <= n:
        return 0.0
    d, hk, h = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads
    per_layer = 2 * t * d * d * hk + t * d * hk + 2 * (t - n) * d * (d + 1) * h
    if rule == "delta":
        per_layer += 2 * (t - n) * d * (d + 1) * hk
    return cfg.n_layers * per_layer


def knn_window(c: int, start: int) -> int:
    """Valid slots a kNN search from a segment starting at token `start` scores: every earlier token, at most
    the store's c."""
    return min(c, start)


def knn_flops(cfg: ModelConfig, t: int) -> tuple[float, float]:
    """Forward FLOPs at Memorizing's kNN layer over t tokens from an empty store: (selection, top-k attention).

    Selection: each query head's query scored against the W = min(knn_size, p) valid slots of its window (a
    segment starting at token p searches every earlier token, at most knn_size), 2 d W. Top-k attention over
    k = min(top_k, W) pairs: the scores again 2 d k, the value sum 2 d_v k, and the softmax counted as 4 k
    (subtract, exp, sum, divide: an approximation; the top-k selection itself is comparisons, not counted).
    Streamed with a carried store the search also scores the store's still-empty slots (masked): those are
    not counted, so early segments of a stream execute more than this."""
    args = resolve_args(cfg.memory, cfg.memory_args)
    c, top_k, _, _ = MemorizingTransformer.resolve_knn(cfg, args)
    d, h = cfg.head_dim, cfg.n_heads
    select = topk = 0
    for p, s in segment_spans(t, cfg.segment_len):
        w = knn_window(c, p)
        k = min(top_k, w)
        select += h * s * 2 * d * w
        topk += h * s * (4 * d * k + 4 * k)
    return float(select), float(topk)


def forward_flops(cfg: ModelConfig, p_linear: int, t: int, training: bool) -> dict[str, float]:
    """Forward FLOPs of t tokens from a document start, by part; the memory is cfg.memory with cfg.memory_args.

    linear: 2 P per row, P = nn.Linear weights; the LM head on every text row in training, on each segment's
      last row when streamed (prefill keeps the last logits only). RMT runs every block over N + 2m rows per
      segment (its memory tokens); its LM head sees text rows only.
    attention: `attention_flops`, the pairs each memory's mask allows.
    memory: the compressive memory's read and write (linear, delta; `compressive_flops`), Memorizing's top-k
      attention (`knn_flops`).
    selection: Memorizing's kNN scores (`knn_flops`), computed without gradient.
    recompute: Transformer-XL's and Memorizing's cached rows with cache=input: K and V projected again from
      the layer's detached input over the whole sequence, 2 t dim (d + d_v) H_kv per layer, in training only.
    """
    name, args = cfg.memory, resolve_args(cfg.memory, cfg.memory_args)
    n = segment_len(cfg, t)
    spans = segment_spans(t, n)
    rows = t + (2 * args["num_mem_tokens"] * len(spans) if name == "rmt" else 0)
    p_head = cfg.vocab_size * cfg.dim
    streamed = math.ceil(t / cfg.segment_len)  # a stream cuts the prompt at segment_len whatever the memory
    parts = {"linear": 2 * (p_linear - p_head) * rows + 2 * p_head * (t if training else streamed),
             "attention": attention_flops(cfg, t), "memory": 0.0, "selection": 0.0, "recompute": 0.0}
    if name in ("linear", "delta"):
        parts["memory"] = compressive_flops(cfg, name, t, n)
    elif name not in ("none", "full", "txl", "memorizing", "rmt"):
        raise ValueError(f"bench/flops.py has no FLOP formula for memory={name}")
    if name == "memorizing":
        parts["selection"], parts["memory"] = knn_flops(cfg, t)
    if training and issubclass(memory_class(name), TransformerXL) and args["cache"] == "input":
        parts["recompute"] = cfg.n_layers * 2 * t * cfg.dim * 2 * cfg.head_dim * cfg.n_kv_heads
    return parts


def train_flops(cfg: ModelConfig, p_linear: int, t: int) -> float:
    """Model FLOPs of one training step: 3 x forward (backward = 2 x forward), no recomputation counted, except
    for the two parts without a full backward: the kNN selection (no gradient: 1 x) and Transformer-XL's
    recomputed cached rows (their input is detached, so only the weight gradient: 2 x).

    With every memory off this is 6 P T + 3 A, P = nn.Linear weights including the LM head. The same formula
    for every row, so MFU compares like with like."""
    f = forward_flops(cfg, p_linear, t, training=True)
    return 3 * (f["linear"] + f["attention"] + f["memory"]) + f["selection"] + 2 * f["recompute"]


def train_bytes(p_all: int, p_linear: int, t: int, vocab: int) -> float:
    """A lower bound on the bytes of one step: AdamW over fp32 params (read param, grad, m, v; write param,
    m, v: 28 B), the grad write (4 B), the bf16 weight copies under autocast and their reads in forward and
    both backward products (12 B per linear weight), and the logits (bf16 out, fp32 loss, grad: ~12 B).
    Activations are not counted: the step is far from bound by these bytes."""
    return 32 * p_all + 12 * p_linear + 12 * t * vocab


def prefill_flops(cfg: ModelConfig, p_linear: int, t: int) -> float:
    """Forward FLOPs of a streamed prompt (`forward_flops`, no training-only work): 2 P per row, the LM head
    only on each segment's last position."""
    return sum(forward_flops(cfg, p_linear, t, training=False).values())


def prefill_bytes(cfg: ModelConfig, p_linear: int, t: int, elt: int) -> float:
    """Every weight read once per streamed segment (the LM head too), the embedding rows of the prompt."""
    return math.ceil(t / cfg.segment_len) * p_linear * elt + t * cfg.dim * elt


def decode_cost(cfg: ModelConfig, p_linear: int, cache_len: int, elt: int) -> tuple[float, float]:
    """FLOPs and fewest bytes of one decode step (B = 1): every weight read once, the cache, the memory."""
    flops = (2 * p_linear + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache_len
             + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (cfg.head_dim + 1))
    nbytes = (p_linear * elt + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_len * elt
              + cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (cfg.head_dim + 1) * 4 + cfg.dim * elt)
    return flops, nbytes

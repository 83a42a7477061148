"""FLOP and byte counts of the benchmarked work, from the model config alone: training, streamed prefill and
decoding, for every registered memory. One formula for every caller (bench/ and scripts/fsdp_bench.py), so
their MFU figures compare.

Counted: matrix products (2 FLOPs per multiply-add) and the memories' own arithmetic. Not counted: norms, RoPE,
activations, gates, the local attention's softmax, the embedding lookup. What a memory computes is its own
`Memory.work` (pairs, rows, memory arithmetic), with its parameters from `cfg.memory_args`, so the counts
follow the run's config and a new memory needs nothing here.
"""
from __future__ import annotations

import math

from torch import nn

from infini_bench.memories import memory_class, resolve_args
from infini_bench.memories.base import Work
from infini_bench.model_config import ModelConfig


def linear_params(model: nn.Module) -> int:
    """Weights every token is multiplied by: all nn.Linear weights, each counted once (tied ones too)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def memory_work(cfg: ModelConfig, t: int, training: bool) -> Work:
    """What cfg's memory, with cfg.memory_args, computes over t tokens (`Memory.work`): each memory states its
    own count, so a new one gets its rows here without a change to this file."""
    return memory_class(cfg.memory).work(cfg, resolve_args(cfg.memory, cfg.memory_args), t, training)


def attention_pairs(cfg: ModelConfig, t: int) -> int:
    """(query, key) pairs one head of one layer's local softmax attention scores over t tokens from a document
    start, exactly as the memory's mask allows (`Memory.work`)."""
    return memory_work(cfg, t, training=False).pairs


def attention_flops(cfg: ModelConfig, t: int) -> float:
    """Forward FLOPs of the local softmax attention over t tokens, all heads and layers: QK^T and PV are 2 d
    each per allowed (query, key) pair (`attention_pairs`)."""
    return cfg.n_layers * cfg.n_heads * attention_pairs(cfg, t) * 4 * cfg.head_dim


def forward_flops(cfg: ModelConfig, p_linear: int, t: int, training: bool) -> dict[str, float]:
    """Forward FLOPs of t tokens from a document start, by part; the memory is cfg.memory with cfg.memory_args.

    linear: 2 P per row a block runs (`Work.rows`: T, or RMT's N + 2m per segment), P = nn.Linear weights less
      the LM head; the LM head on every text row in training, on each segment's last row when streamed (prefill
      keeps the last logits only).
    attention: `attention_flops`, the pairs each memory's mask allows.
    memory, selection, recompute: the memory's own arithmetic, its search without gradient, and the keys and
      values it recomputes in training (`Memory.work`: the compressive memory's read and write, Memorizing's
      top-k attention and kNN scores, Transformer-XL's cached rows projected again).
    """
    work = memory_work(cfg, t, training)
    p_head = cfg.vocab_size * cfg.dim
    streamed = math.ceil(t / cfg.segment_len)  # a stream cuts the prompt at segment_len whatever the memory
    return {"linear": 2 * (p_linear - p_head) * work.rows + 2 * p_head * (t if training else streamed),
            "attention": cfg.n_layers * cfg.n_heads * work.pairs * 4 * cfg.head_dim, "memory": work.memory,
            "selection": work.selection, "recompute": work.recompute}


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

"""FLOP and byte counts of the benchmarked work, from the model config alone: training, streamed prefill and
decoding. One formula for every caller (bench/ and scripts/fsdp_bench.py), so their MFU figures compare."""
from __future__ import annotations

import math

from torch import nn

from infini_bench.model import ModelConfig

def linear_params(model: nn.Module) -> int:
    """Weights every token is multiplied by: all nn.Linear weights, each counted once (tied ones too)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def attention_flops(cfg: ModelConfig, t: int, n: int) -> float:
    """Forward FLOPs of causal softmax attention inside segments of n over t tokens, all heads and layers.

    Per head and segment of length s: QK^T and PV are 2 s^2 d each, halved by the causal mask.
    """
    lengths = [n] * (t // n) + ([t % n] if t % n else [])
    return cfg.n_layers * cfg.n_heads * sum(s * s for s in lengths) * 2 * cfg.head_dim


def memory_flops(cfg: ModelConfig, rule: str, t: int, n: int) -> float:
    """Forward FLOPs of the compressive memory over t tokens from an empty memory.

    Write (Eq. 8) 2 t d d_v H_kv; z update t d H_kv; read (Eq. 7, numerator and denominator) 2 (t - n) d
    (d_v + 1) H, since the first segment has nothing to read; the delta rule (Eq. 9) reads once more per key.
    """
    if rule == "none" or t <= n:
        return 0.0
    d, hk, h = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads
    per_layer = 2 * t * d * d * hk + t * d * hk + 2 * (t - n) * d * (d + 1) * h
    if rule == "delta":
        per_layer += 2 * (t - n) * d * (d + 1) * hk
    return cfg.n_layers * per_layer


def train_flops(cfg: ModelConfig, p_linear: int, rule: str, t: int, n: int) -> float:
    """Model FLOPs of one training step: 3 x forward (backward = 2 x forward), no recomputation counted.

    6 P T + 3 (attention + memory forward), P = nn.Linear weights including the LM head (the embedding
    lookup is no matmul). Same formula for every row, so MFU compares like with like.
    """
    return 6 * p_linear * t + 3 * (attention_flops(cfg, t, n) + memory_flops(cfg, rule, t, n))


def train_bytes(p_all: int, p_linear: int, t: int, vocab: int) -> float:
    """A lower bound on the bytes of one step: AdamW over fp32 params (read param, grad, m, v; write param,
    m, v: 28 B), the grad write (4 B), the bf16 weight copies under autocast and their reads in forward and
    both backward products (12 B per linear weight), and the logits (bf16 out, fp32 loss, grad: ~12 B).
    Activations are not counted: the step is far from bound by these bytes."""
    return 32 * p_all + 12 * p_linear + 12 * t * vocab


def prefill_flops(cfg: ModelConfig, p_linear: int, rule: str, t: int, n: int) -> float:
    """Forward FLOPs of a streamed prompt: 2 P T, the LM head only on each segment's last position."""
    p_head = cfg.vocab_size * cfg.dim
    segs = math.ceil(t / n)
    return 2 * (p_linear - p_head) * t + 2 * p_head * segs + attention_flops(cfg, t, n) + memory_flops(cfg, rule, t, n)


def prefill_bytes(cfg: ModelConfig, p_linear: int, t: int, n: int, elt: int) -> float:
    """Every weight read once per segment (the LM head too), the embedding rows of the prompt."""
    return math.ceil(t / n) * p_linear * elt + t * cfg.dim * elt


def decode_cost(cfg: ModelConfig, p_linear: int, cache_len: int, elt: int) -> tuple[float, float]:
    """FLOPs and fewest bytes of one decode step (B = 1): every weight read once, the cache, the memory."""
    flops = (2 * p_linear + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache_len
             + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (cfg.head_dim + 1))
    nbytes = (p_linear * elt + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_len * elt
              + cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (cfg.head_dim + 1) * 4 + cfg.dim * elt)
    return flops, nbytes

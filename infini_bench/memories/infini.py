"""Infini-attention's compressive memory (linear and delta rules), and `none`: local attention only.

The math lives in `infini_bench.compressive` (the functional core and its segment-parallel fast path); these
classes put it behind the memory contract.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from infini_bench.attention import EMPTY_READS
from infini_bench.compressive import BACKPROPS, PRODUCTS, MemoryState, infini_attention, memory_read, memory_write
from infini_bench.errors import check_choice
from infini_bench.memories.base import Footprint, Memory, Work, register_memory


READ_NORMS = ("none", "rms")


@register_memory
class NoMemory(Memory):
    """Causal attention inside each segment and nothing across segments: the ablation every table needs."""

    name = "none"

    def active(self) -> bool:
        return False

    def forward(self, q, k, v, gate, state, rotary, kv_detached=None):
        out, _ = infini_attention(q, k, v, q.new_zeros(q.shape[1]), segment_len=self.cfg.segment_len,
                                  rule="none", rotary=rotary)
        return out, None


class CompressiveMemory(Memory):
    """M (B, H_kv, D, D_v) and z (B, H_kv, D) per layer, fp32; read by Eq. 7, written by Eq. 8 or 9."""

    gated = True
    rule: str
    # empty_read: what a document's first segment reads (attention.EMPTY_READS). zero is Eq. 10 with M_0 = 0:
    # (1 - sigmoid(beta)) A_dot, as in every other segment; local keeps A_dot unscaled there (an ablation).
    # products, backprop and read_norm: the ablation study's options (compressive.py's docstring); the defaults
    # are the paper's reading.
    defaults = {"empty_read": "zero", "products": "activation", "backprop": "full", "read_norm": "none"}

    def __init__(self, cfg, layer: int, args: dict[str, Any]):
        super().__init__(cfg, layer, args)
        check_choice("memory.empty_read", args["empty_read"], EMPTY_READS)
        check_choice("memory.products", args["products"], PRODUCTS)
        check_choice("memory.backprop", args["backprop"], BACKPROPS)
        check_choice("memory.read_norm", args["read_norm"], READ_NORMS)
        self.empty_read, self.products, self.backprop = args["empty_read"], args["products"], args["backprop"]
        # rms: A_mem RMS-normalised per head, times a learned scale per head and channel (1-D: no weight decay)
        self.read_scale = (nn.Parameter(torch.ones(cfg.n_heads * cfg.head_dim)) if args["read_norm"] == "rms"
                           else None)

    def reset_parameters(self) -> None:
        if self.read_scale is not None:
            with torch.no_grad():
                self.read_scale.fill_(1.0)

    def forward(self, q, k, v, gate, state, rotary, kv_detached=None):
        return infini_attention(q, k, v, gate, segment_len=self.cfg.segment_len, rule=self.rule, state=state,
                                rotary=rotary, empty_read=self.empty_read, products=self.products,
                                backprop=self.backprop, read_scale=self.read_scale)

    def read(self, q: Tensor, state: MemoryState) -> tuple[Tensor, Tensor]:
        b, h = q.shape[:2]
        hk = state.z.shape[1]
        # Nothing written yet (an empty fixed-shape state): z = 0, and the read is 0 / 0; the mix then takes
        # empty_read's output. Once written, z > 0 everywhere because ELU + 1 > 0.
        has = (state.z.sum(-1) > 0).repeat_interleave(h // hk, dim=1).view(b, h, 1, 1)
        return memory_read(q, state, products=self.products, backprop=self.backprop,
                           read_scale=self.read_scale), has

    def write(self, state: MemoryState | None, k: Tensor, v: Tensor) -> MemoryState:
        return memory_write(k, v, self.rule, state, products=self.products)

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        cfg = self.cfg
        return MemoryState(torch.zeros(batch, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, device=device),
                           torch.zeros(batch, cfg.n_kv_heads, cfg.head_dim, device=device))

    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """Table 1: d_key (d_value + 1) H l, in fp32 (M and z), one memory per kv head here."""
        per_head = cfg.head_dim * (cfg.head_dim + 1)
        state = per_head * cfg.n_kv_heads * cfg.n_layers
        return Footprint(per_head * cfg.n_heads * cfg.n_layers, state, 4 * state)

    @classmethod
    def work(cls, cfg, args: dict[str, Any], t: int, training: bool) -> Work:
        """Local attention as `none`, plus the memory's write and read (`compressive_flops`)."""
        return super().work(cfg, args, t, training)._replace(memory=compressive_flops(cfg, cls.rule, t))


def compressive_flops(cfg, rule: str, t: int) -> float:
    """Forward FLOPs of the compressive memory over t tokens from an empty memory, segments of N.

    Write (Eq. 8) 2 t d d_v H_kv; z update t d H_kv; read (Eq. 7, numerator and denominator) 2 (t - N) d
    (d_v + 1) H, since the first segment has nothing to read; the delta rule (Eq. 9) reads once more per key.
    """
    n = cfg.segment_len
    if t <= n:
        return 0.0
    d, hk, h = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads
    per_layer = 2 * t * d * d * hk + t * d * hk + 2 * (t - n) * d * (d + 1) * h
    if rule == "delta":
        per_layer += 2 * (t - n) * d * (d + 1) * hk
    return float(cfg.n_layers * per_layer)


@register_memory
class LinearMemory(CompressiveMemory):
    """Eq. 8: M_s = M_{s-1} + sigma(K)^T V."""

    name = "linear"
    rule = "linear"


@register_memory
class DeltaMemory(CompressiveMemory):
    """Eq. 9: write only what the memory does not already return for each key."""

    name = "delta"
    rule = "delta"

"""Recurrent Memory Transformer (Bulatov et al. 2022), decoder-only: memory tokens carried between segments.

Each segment of L <= N tokens runs through the whole stack as [read memory (m); tokens (L); write memory (m)],
RoPE positions 0 .. 2m + L - 1 (restarting every segment, so m = 0 is exactly `none`). The final-norm output
at the write positions is the next memory: it enters the next segment as the input embeddings of both its
read and its write rows. M_0, the memory at a document start, is a learned (m, dim) parameter. Logits are
returned for the text positions only. Training backpropagates through every segment (`bptt_depth` detaches
the memory every k segments), optionally recomputing each segment in the backward pass.

The mask (the original LM-RMT's): read rows see all read rows; text rows see the read rows and the text
causally, never the write rows; write rows see everything, all write rows included. `causal: true` takes the
plain causal mask over [read; text; write] instead.

The memory changes the stack, so it comes in two parts: `MemoryTokens`, the stack-level part the model calls
(`memories.base.StackMemory`: M_0, wrapping a segment in its memory rows, taking the next memory out of the
output), and `RecurrentMemory`, the per-layer part, which attends among a segment's rows under the mask.

A partial last segment is processed like a full one, its write rows right after its L tokens, as training
does with a shorter tail; the memory returned after it summarises that partial segment. So a sequence split
at segment boundaries (`model.stream`, evaluation, `model(ids[:, :2N])` then the rest) equals one call.
Decoding: a segment's read rows run once, at its first token, and their keys and values fill the first m
slots of each layer's cache; text tokens follow at m, m + 1, ...; when the segment is full its write rows run
over [read; text] from the cache, which gives the next memory. Write rows do not change the text outputs of
their own segment, so this equals the parallel forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infini_bench.attention import lower_right
from infini_bench.errors import check_bool, check_int
from infini_bench.memories.base import (Footprint, Memory, StackMemory, Work, causal_pairs, register_memory,
                                        segment_spans)


def check_args(args: dict[str, Any]) -> None:
    """num_mem_tokens and bptt_depth integers >= 0, causal and checkpoint_segments booleans."""
    check_int("memory.num_mem_tokens", args["num_mem_tokens"])
    check_int("memory.bptt_depth", args["bptt_depth"])
    for key in ("causal", "checkpoint_segments"):
        check_bool(f"memory.{key}", args[key])


def segment_mask(m: int, length: int, causal: bool, device: torch.device | None = None) -> Tensor:
    """(S, S) bool over [read (m); text (length); write (m)], S = 2m + length: which keys each row sees."""
    idx = torch.arange(2 * m + length, device=device)
    tril = idx[None, :] <= idx[:, None]
    if causal:
        return tril
    read, write = idx < m, idx >= m + length
    # Read rows: the read keys (tril adds no others); text rows: read + causal text (tril stops before the write
    # keys); write rows: every key.
    return read[None, :] | tril | write[:, None]


def rows_attention(q: Tensor, k: Tensor, v: Tensor, rotary, m: int, length: int, causal: bool,
                   flash: bool = True) -> Tensor:
    """Attention of the rows [read (m); text (length); write (m)] under `segment_mask`, without building it.

    A boolean mask sends SDPA to a slower kernel than flash; the mask is three flash-friendly blocks instead:
    read rows over the read keys (no mask), text rows over read + text keys (causal, aligned bottom-right, so
    every read key is seen), write rows over every key (no mask). q (B, H, S, D), k and v (B, H_kv, S, D)
    un-rotated at positions 0 .. S-1 -> (B, H, S, D_v). `flash=False` gives the text rows an explicit mask
    instead of the cached bias (`lower_right`), whose lookup by length would make every partial segment
    length a trace of its own in a compiled block."""
    qr, kr, gqa = rotary(q), rotary(k), q.shape[1] != k.shape[1]
    if causal or m == 0:  # segment_mask is then the plain causal mask
        return F.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=gqa)
    seen = m + length
    read = F.scaled_dot_product_attention(qr[:, :, :m], kr[:, :, :m], v[:, :, :m], enable_gqa=gqa)
    if flash:
        mask = lower_right(length, seen)
    else:
        mask = torch.ones(length, seen, dtype=torch.bool, device=q.device).tril(m)
    text = F.scaled_dot_product_attention(qr[:, :, m: seen], kr[:, :, :seen], v[:, :, :seen], attn_mask=mask,
                                          enable_gqa=gqa)
    write = F.scaled_dot_product_attention(qr[:, :, seen:], kr, v, enable_gqa=gqa)
    return torch.cat([read, text, write], dim=2)


class MemoryTokens(StackMemory):
    """The stack-level part: M_0 and the m memory vectors around every segment. States are (B, m, dim), None = M_0."""

    def __init__(self, cfg, args: dict[str, Any]):
        super().__init__(cfg, args)
        check_args(args)
        self.rows, self.causal = args["num_mem_tokens"], args["causal"]
        self.bptt_depth, self.recompute = args["bptt_depth"], args["checkpoint_segments"]
        self.initial = nn.Parameter(torch.empty(self.rows, cfg.dim))  # M_0 (m, dim)
        if self.rows and not self.causal:
            lower_right(cfg.segment_len, self.rows + cfg.segment_len)  # a full segment's text rows, made uncompiled

    def reset_parameters(self) -> None:
        """Independent random rows: identical rows would stay identical through every layer."""
        nn.init.normal_(self.initial, std=0.02)

    def start(self, batch: int) -> Tensor:
        return self.initial.unsqueeze(0).expand(batch, -1, -1)  # (B, m, dim)

    def wrap(self, x: Tensor, state: Tensor) -> Tensor:
        """[read memory (m); text (L); write memory (m)], both memory blocks the carried vectors."""
        state = state.to(x.dtype)
        return torch.cat([state, x, state], dim=1)

    def unwrap(self, h: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """The text rows, and the write rows as the next memory."""
        m = self.rows
        return h[:, m: m + length], h[:, m + length:]

    def carry(self, index: int, state: Tensor) -> Tensor:
        if self.bptt_depth and (index + 1) % self.bptt_depth == 0:  # truncated BPTT (counted within one call)
            return state.detach()
        return state

    def memory_rows(self, state: Tensor | None, batch: int) -> Tensor:
        return self.start(batch) if state is None else state

    def rows_visible(self, device: torch.device) -> Tensor:
        """(m, m): how the read rows, and the write rows, see each other."""
        return segment_mask(self.rows, 0, self.causal, device)[: self.rows, : self.rows]


@register_memory
class RecurrentMemory(Memory):
    """The per-layer part: attention among a segment's rows [read; text; write] under the mask; no state of its own."""

    name = "rmt"
    defaults = {"num_mem_tokens": 100, "causal": False, "bptt_depth": 0, "checkpoint_segments": False}
    stack = MemoryTokens
    capturable = False  # a segment end runs the write rows through the stack: decoded eagerly

    def __init__(self, cfg, layer: int, args: dict[str, Any]):
        super().__init__(cfg, layer, args)
        self.m, self.causal = args["num_mem_tokens"], args["causal"]  # checked by MemoryTokens

    def active(self) -> bool:
        return False  # nothing per layer: the memory is carried by the stack

    def positions(self, t: int, state) -> int:
        return 2 * self.m + self.cfg.segment_len  # [read; text; write]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate, state, rotary, kv_detached=None) -> tuple[Tensor, None]:
        """The rows [read (m); text (L); write (m)] of one segment -> (B, H, 2m + L, D_v); nothing carried."""
        length = q.shape[2] - 2 * self.m
        return rows_attention(q, k, v, rotary, self.m, length, self.causal, length == self.cfg.segment_len), None

    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """Table 1: d_model p l 2 (read and write memory in every layer). The state is what is carried between
        segments, the m x dim memory vectors, in the activations' dtype (bf16). Decoding also caches the read
        rows' keys and values per layer (2 m H_kv D l), recomputed from those vectors: not counted."""
        m = args["num_mem_tokens"]
        check_int("memory.num_mem_tokens", m)
        return Footprint(cfg.dim * m * cfg.n_layers * 2, m * cfg.dim, 2 * m * cfg.dim)

    @classmethod
    def work(cls, cfg, args: dict[str, Any], t: int, training: bool) -> Work:
        """Every block runs N + 2m rows per segment (its memory tokens), under `segment_mask` (`mask_pairs`)."""
        m = args["num_mem_tokens"]
        spans = segment_spans(t, cfg.segment_len)
        return Work(sum(mask_pairs(m, s, args["causal"]) for _, s in spans), t + 2 * m * len(spans))


def mask_pairs(m: int, length: int, causal: bool) -> int:
    """Pairs `segment_mask` allows over [read (m); text (length); write (m)]: causal, plain causal over the
    2m + length rows; else read rows see the m read keys, text rows the read keys and the text causally, write
    rows all 2m + length keys."""
    if causal:
        return causal_pairs(2 * m + length)
    return m * m + causal_pairs(length, m) + m * (2 * m + length)

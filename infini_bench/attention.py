"""Attention that every model here shares, whatever its memory: causal softmax attention inside a segment
(Eq. 6 of the Infini-attention paper, arXiv 2404.07143), over all segments at once or over one segment with
keys and values before it, and the per-head gate that mixes a memory's read into it (Eq. 10).

The compressive memory's own math (Eqs. 7-9) is in `infini_bench.compressive`; a memory's contract in
`infini_bench.memories.base`.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right

# What a segment reads from an empty memory (a document's first segment). zero: A_mem = 0, so Eq. 10 gives
# (1 - sigmoid(beta)) A_dot, the same function of the local output as in every later segment (the paper's M_0 = 0,
# docs/PAPER_NOTES.md). local: A_dot alone, unscaled (the ablation).
EMPTY_READS = ("zero", "local")


class Context(NamedTuple):
    """Keys and values before the segment: k (B, H_kv, M, D) un-rotated, v (B, H_kv, M, D_v), valid (B, M)."""

    k: Tensor
    v: Tensor
    valid: Tensor


class Rotary(Protocol):
    """RoPE's signature (`blocks.Rotary`): rotate x (..., L, D) as if at positions offset .. offset + L - 1."""

    def __call__(self, x: Tensor, offset: int | Tensor = 0) -> Tensor: ...


def split_segments(x: Tensor, n: int) -> Tensor:
    """(B, H, S*N, D) -> (B, H, S, N, D)."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // n, n, d)


def attention_backends() -> None:
    """Leave SDPA's cuDNN backend out of this process (flash, memory-efficient and math attention remain): on an
    H200 (torch 2.11) its backward failed with `mha_graph.execute(...).is_good()` in Memorizing's recall runs,
    whose every micro-batch has another length (docs/RECALL.md). Runs (init_distributed) and the bench call it,
    so the bench measures the kernels training uses."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def parallel_local_attention(q: Tensor, k: Tensor, v: Tensor, n: int, rotary: Rotary | None) -> Tensor:
    """Eq. 6: causal softmax attention inside each segment, all segments in one SDPA call.

    q (B, H, S*N, D), k (B, H_kv, S*N, D), v (B, H_kv, S*N, D_v) -> (B, H, S*N, D_v).
    """
    b, h, t, _ = q.shape
    s = t // n

    def fold(x: Tensor) -> Tensor:  # (B, H, S*N, D) -> (B*S, H, N, D): segments become batch items
        return split_segments(x, n).transpose(1, 2).reshape(b * s, x.shape[1], n, x.shape[-1])

    qs, ks, vs = fold(q), fold(k), fold(v)
    if rotary is not None:  # positions restart at 0 in every segment; RoPE is relative, so this is exact
        qs, ks = rotary(qs), rotary(ks)
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.reshape(b, s, h, n, -1).transpose(1, 2).reshape(b, h, t, -1)


def local_attention(q: Tensor, k: Tensor, v: Tensor, rotary: Rotary, ctx: Context | None, pos: int | Tensor = 0,
                    visible: Tensor | None = None) -> Tensor:
    """Causal softmax attention of L queries at segment positions pos .. pos+L-1 over the context and keys.

    q (B, H, L, D), k and v (B, H_kv, S, D) with S >= pos + L (the segment's keys so far, or a preallocated
    cache), un-rotated. The context sits at positions 0 .. M-1, the segment at M onwards. `visible` (L, S)
    overrides the causal mask over the segment's keys (RMT's memory rows). Returns (B, H, L, D_v)."""
    m = 0 if ctx is None else ctx.k.shape[2]
    length, s = q.shape[2], k.shape[2]
    qr, kr = rotary(q, offset=pos + m), rotary(k, offset=m)
    if visible is None and ctx is None and length == 1 and not isinstance(pos, Tensor) and s == pos + 1:
        # One query after every key (an eager decoding step over the cache filled so far) sees them all: no
        # mask, so SDPA may take its flash kernel, which accepts none (the 1B shape decoded at 35 ms a token on
        # an H200 with the mask, docs/BENCHMARKS.md).
        return F.scaled_dot_product_attention(qr, kr, v.to(qr.dtype), enable_gqa=q.shape[1] != k.shape[1])
    if visible is None:
        rows = torch.arange(length, device=q.device)[:, None] + pos
        visible = torch.arange(s, device=q.device)[None, :] <= rows  # (L, S): causal within the segment
    if ctx is None:
        keys, values, mask = kr, v, visible
    else:
        keys = torch.cat([rotary(ctx.k, offset=0), kr], dim=2)  # (B, H_kv, M + S, D)
        values = torch.cat([ctx.v.to(v.dtype), v], dim=2)
        b = q.shape[0]
        mask = torch.cat([ctx.valid[:, None, None, :].expand(b, 1, length, m),
                          visible.expand(b, 1, length, s)], dim=-1)  # (B, 1, L, M + S)
    return F.scaled_dot_product_attention(qr, keys, values.to(qr.dtype), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


_LOWER_RIGHT: dict[tuple[int, int], CausalBias] = {}


def lower_right(queries: int, keys: int) -> CausalBias:
    """The causal bias aligned bottom-right for `queries` rows over `keys` keys (row i sees keys j <= keys -
    queries + i), which SDPA runs with a flash kernel. One object per shape, kept: building a CausalBias inside
    a compiled region breaks the graph, so a memory asks for its shapes once outside it (at construction, or
    in an uncompiled loop) and the compiled code only looks them up."""
    bias = _LOWER_RIGHT.get((queries, keys))
    if bias is None:
        bias = _LOWER_RIGHT[(queries, keys)] = causal_lower_right(queries, keys)
    return bias


def mix(local: Tensor, read: tuple[Tensor, Tensor] | None, gate: Tensor | None, empty_read: str = "local") -> Tensor:
    """Eq. 10: sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_local per head. Where nothing was read (no state, or
    an empty one), `empty_read` decides: zero reads A_mem = 0, so (1 - sigmoid(beta)) A_local; local keeps
    A_local unscaled (EMPTY_READS)."""
    if gate is None:
        return local
    g = torch.sigmoid(gate.float()).view(1, -1, 1, 1)
    scaled = (1.0 - g) * local.float()
    empty = scaled if empty_read == "zero" else local.float()
    if read is None:
        return empty.to(local.dtype)
    a_mem, has = read
    mixed = g * a_mem + scaled
    return torch.where(has, mixed, empty).to(local.dtype)

"""The decoder's block and its parts: RoPE, RMSNorm, the attention around a layer's memory, SwiGLU.

`Attention` and `Block` serve the three ways `infini_bench.model` runs the stack: segment-parallel, a segment at a
time, and token by token with a `LocalCache` (decoding).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infini_bench.attention import Context, local_attention, mix
from infini_bench.errors import ConfigError
from infini_bench.memories import memory_class, resolve_args
from infini_bench.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """RoPE inverse frequencies, with the Llama-3 frequency-dependent scaling when the config asks for it."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type")) in (None, "default"):
        return inv_freq.float()
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return (inv_freq / sc["factor"]).float()
    if kind != "llama3":
        raise ConfigError("model.rope_scaling.rope_type", f"{kind!r} is not one of default, linear, llama3")
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    smooth = ((old_len / wavelen) - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    out = torch.where((wavelen >= old_len / high) & (wavelen <= old_len / low), mid, out)
    return out.float()


class Rotary(nn.Module):
    """Rotary position embedding (half-split convention, as in Llama checkpoints)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def _apply(self, fn, recurse: bool = True):
        """Moves with the model but stays fp32: model.to(bfloat16) would round the frequencies, and the angles
        of late positions drift (0.17 relative error on the rotated vector at position 2047)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if not inv_freq.is_meta:  # from meta (to_empty) there is nothing to keep; pretrained.py refills it
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def table(self, length: int, device: torch.device) -> None:
        """Make sure the cos/sin table covers positions 0 .. length - 1 on `device`."""
        self._cos_sin(length, device)

    def _cos_sin(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] < length or self._cache[1] != device:
            with torch.inference_mode(False):  # a cache built while decoding must still serve training
                pos = torch.arange(length, device=device, dtype=torch.float32)
                ang = torch.outer(pos, self.inv_freq.to(device))  # (L, D/2)
                ang = torch.cat([ang, ang], dim=-1)  # (L, D)
                self._cache = (length, device, ang.cos(), ang.sin())
        return self._cache[2], self._cache[3]

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Rotate x (..., L, D) as if its tokens sat at positions offset .. offset + L - 1.

        `offset` may be a 0-dim tensor on x's device (graph-captured decoding: no host sync); then the table
        must already cover it, which `table(segment_len)` ensures."""
        length = x.shape[-2]
        if isinstance(offset, Tensor):
            cos, sin = self._cache[2], self._cache[3]
            at = offset + torch.arange(length, device=x.device)
            cos, sin = cos.index_select(0, at).to(x.dtype), sin.index_select(0, at).to(x.dtype)
        else:
            # Compiled blocks only read the table, which SegmentTransformer.fill_rotary grew outside them:
            # checking its length here would specialise the graph on it, and every growth would recompile.
            cos, sin = (self._cache[2], self._cache[3]) if torch.compiler.is_compiling() else \
                self._cos_sin(offset + length, x.device)
            cos, sin = cos[offset: offset + length].to(x.dtype), sin[offset: offset + length].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LocalCache(NamedTuple):
    """The current segment's keys and values while decoding: k (B, H_kv, N, D) un-rotated, v (B, H_kv, N, D_v).
    With cfg.token_shift the first layer's also keeps `prev` (B, 1, dim), the embedding of the last token fed."""

    k: Tensor
    v: Tensor
    prev: Tensor | None = None


class Rows(NamedTuple):
    """Rows a stack memory runs through a block outside a segment (while decoding): which of them each row sees,
    and the layer's keys and values before them (its cache), seen by every row."""

    visible: Tensor  # (L, L) bool
    ctx: Context | None


class Attention(nn.Module):
    """Projections, the memory and its gate around local causal attention."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.memory = memory_class(cfg.memory)(cfg, layer, resolve_args(cfg.memory, cfg.memory_args))
        # Eq. 10: one raw gate logit per query head; sigmoid(0) = 0.5 mixes the memory and local attention.
        gated = self.memory.gated and self.memory.active()
        self.gate = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.gate_init))) if gated else None

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, heads * D) -> (B, heads, T, D), a strided view."""
        return x.view(x.shape[0], x.shape[1], -1, self.cfg.head_dim).transpose(1, 2)

    def forward(self, h: Tensor, state, rotary: Rotary, h_detached: Tensor | None = None,
                cache: LocalCache | None = None, pos: int | Tensor = 0, rows: Rows | None = None):
        """h (B, T, dim) normed -> (B, T, dim) and the memory state after it.

        Without `cache`, T tokens from a segment boundary (segment-parallel). With it, T tokens at positions
        pos .. pos+T-1 of the current segment, whose earlier keys sit in the cache; the state is not written
        (the decoder writes it when the segment is full). With `rows`, a stack memory's rows: they attend as
        `rows` says, and their keys and values come back in the state's place, for the decoding cache."""
        b, t, _ = h.shape
        q, k, v = self.split_heads(self.wq(h)), self.split_heads(self.wk(h)), self.split_heads(self.wv(h))
        if rows is not None:
            out, state = local_attention(q, k, v, rotary, rows.ctx, visible=rows.visible), LocalCache(k, v)
        elif cache is None:
            kv_detached = None
            if h_detached is not None:  # Transformer-XL: cached rows recomputed from the detached input
                kv_detached = (self.split_heads(self.wk(h_detached)), self.split_heads(self.wv(h_detached)))
            out, state = self.memory(q, k, v, self.gate, state, rotary, kv_detached)
        else:
            out = cached_attention(self.memory, q, k, v, self.gate, state, cache, pos, rotary)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1)), state  # Eq. 11


def cached_attention(memory, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state, cache: LocalCache,
                     pos: int | Tensor, rotary: Rotary) -> Tensor:
    """L new tokens at segment positions pos .. pos+L-1: written into the cache, then local attention over the
    cache (slots 0 .. pos+i visible to token i) and the memory's context, mixed with its read (Eq. 10).

    Fixed shapes whatever pos is (a 0-dim tensor while graph-captured), so one CUDA graph serves every step."""
    length = q.shape[2]
    if isinstance(pos, Tensor):
        at = pos + torch.arange(length, device=q.device)
        cache.k.index_copy_(2, at, k.to(cache.k.dtype))  # under autocast: bf16 into the model-dtype cache, as
        cache.v.index_copy_(2, at, v.to(cache.v.dtype))  # the eager branch's slice assignment casts
        keys, values = cache.k, cache.v
    else:  # eager: only the slots filled so far (slots past them are masked out anyway: the same function)
        cache.k[:, :, pos: pos + length] = k
        cache.v[:, :, pos: pos + length] = v
        keys, values = cache.k[:, :, : pos + length], cache.v[:, :, : pos + length]
    ctx = memory.context(state) if state is not None else None
    local = local_attention(q, keys, values, memory.local_rotary(rotary), ctx, pos=pos)
    return mix(local, memory.read(q, state) if state is not None else None, gate, memory.empty_read)


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, state, rotary: Rotary, cache: LocalCache | None = None, pos: int | Tensor = 0,
                rows: Rows | None = None):
        """x (B, T, dim) -> (B, T, dim) and the layer's memory state after it (see Attention.forward)."""
        h_detached = None
        if cache is None and self.attn.memory.detached_input and torch.is_grad_enabled():
            h_detached = self.attn_norm(x.detach())  # the cached rows' input: no gradient into earlier segments
        h, state = self.attn(self.attn_norm(x), state, rotary, h_detached, cache, pos, rows)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), state

"""Transformer-XL's segment-level recurrence (Dai et al. 2019), and full causal attention.

Transformer-XL: each layer keeps the keys and values of the last `mem_len` tokens before the segment,
detached, and the segment's queries attend to them and to the segment causally (the mask is aligned
bottom-right: query i sees cache + segment keys j <= M + i). The cache sits at positions 0 .. M-1 and the
segment at M .. M+N-1 (window-local RoPE). With `cache: input` (the paper's) the cached keys and values are
recomputed in training from the layer's detached input with the current weights, so gradients reach W_k and
W_v through the cached rows but never the earlier segment; `cache: kv` detaches the projections instead.
In inference both carry the same values, so the state holds projected keys and values.

Full attention: every query sees every earlier token of the document; its state is the whole KV cache.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infini_bench.attention import Context, local_attention, lower_right
from infini_bench.errors import ConfigError, check_int
from infini_bench.memories.base import Footprint, Memory, Work, causal_pairs, register_memory, segment_spans


class KVCache(NamedTuple):
    """Keys (B, H_kv, M, D) un-rotated, values (B, H_kv, M, D_v), which slots hold a token (B, M)."""

    k: Tensor
    v: Tensor
    valid: Tensor


def _empty_cache(cfg, batch: int, length: int, device, dtype) -> KVCache:
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch, length, dtype=torch.bool, device=device))


def _kv_floats(cfg, heads: int, tokens: int) -> int:
    return 2 * cfg.head_dim * heads * tokens * cfg.n_layers  # (d_key + d_value) H tokens l


@register_memory
class TransformerXL(Memory):
    name = "txl"
    defaults = {"mem_len": None, "cache": "input"}  # mem_len None: the segment length

    def __init__(self, cfg, layer: int, args: dict[str, Any]):
        super().__init__(cfg, layer, args)
        self.mem_len = self.resolve_mem_len(cfg, args)
        if args["cache"] not in ("input", "kv"):
            raise ConfigError("memory.cache", f"{args['cache']!r} is not one of input, kv")
        self.detached_input = args["cache"] == "input"
        if 0 < self.mem_len <= cfg.segment_len:
            lower_right(cfg.segment_len, self.mem_len + cfg.segment_len)  # the fast path's mask, made uncompiled

    @staticmethod
    def resolve_mem_len(cfg, args: dict[str, Any]) -> int:
        mem_len = cfg.segment_len if args.get("mem_len") is None else args["mem_len"]
        check_int("memory.mem_len", mem_len)
        return mem_len

    def active(self) -> bool:
        return self.mem_len > 0

    def context_len(self) -> int:
        return self.mem_len

    def context(self, state: KVCache) -> Context | None:
        return Context(state.k, state.v, state.valid) if self.mem_len else None

    def write(self, state: KVCache | None, k: Tensor, v: Tensor) -> KVCache | None:
        """Shift the segment in, keep the last mem_len tokens (FIFO), detached."""
        if not self.mem_len:
            return None
        if state is None:
            state = _empty_cache(self.cfg, k.shape[0], self.mem_len, k.device, k.dtype)
        m = self.mem_len
        valid = torch.cat([state.valid, state.valid.new_ones(k.shape[0], k.shape[2])], dim=1)
        return KVCache(torch.cat([state.k, k.detach().to(state.k.dtype)], dim=2)[:, :, -m:],
                       torch.cat([state.v, v.detach().to(state.v.dtype)], dim=2)[:, :, -m:], valid[:, -m:])

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache | None:
        return _empty_cache(self.cfg, batch, self.mem_len, device, dtype) if self.mem_len else None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate, state: KVCache | None, rotary,
                kv_detached: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, KVCache | None]:
        """All segments in one SDPA call: segments folded into the batch, each with its window of the mem_len
        tokens before it (from `state` for the first ones); a partial last segment in a second call."""
        n, m, t = self.cfg.segment_len, self.mem_len, q.shape[2]
        if m == 0:
            return super().forward(q, k, v, gate, state, rotary, kv_detached)
        if t % n:
            return self._with_tail(q, k, v, state, rotary, kv_detached)
        b, h, _, d = q.shape
        hk, s, dv = k.shape[1], t // n, v.shape[-1]
        kd, vd = kv_detached if kv_detached is not None else (k.detach(), v.detach())

        def fold(x: Tensor) -> Tensor:  # (B, H, S*N, D) -> (B, S, H, N, D)
            return x.reshape(b, x.shape[1], s, n, x.shape[-1]).transpose(1, 2)

        def windows(x: Tensor, count: int) -> Tensor:  # (B, H_kv, M + (count-1) N, D) -> (B*count, H_kv, M, D)
            return x.unfold(2, m, n).permute(0, 2, 1, 4, 3).reshape(b * count, hk, m, x.shape[-1])

        qs, ks, vs = rotary(fold(q), offset=m), rotary(fold(k), offset=m), fold(v)  # the segment at M .. M+N-1
        gqa = h != hk
        if state is None and m <= n:
            # A document start: segment 0 has an empty cache, so plain causal attention inside it; every later
            # segment's cache is full, tokens [sN - M, sN) of this sequence, under the bottom-right causal bias
            # (a flash kernel). Decided from shapes alone: no host sync.
            out = F.scaled_dot_product_attention(qs[:, 0], ks[:, 0], vs[:, 0], is_causal=True, enable_gqa=gqa)
            out = out.unsqueeze(1)  # (B, 1, H, N, D_v)
            if s > 1:
                cache_k = rotary(windows(kd[:, :, n - m: (s - 1) * n], s - 1), offset=0)
                cache_v = windows(vd[:, :, n - m: (s - 1) * n], s - 1)
                keys = torch.cat([cache_k, ks[:, 1:].reshape(-1, hk, n, d)], dim=2)  # (B*(S-1), H_kv, M+N, D)
                values = torch.cat([cache_v, vs[:, 1:].reshape(-1, hk, n, dv)], dim=2)
                rest = F.scaled_dot_product_attention(qs[:, 1:].reshape(-1, h, n, d), keys, values,
                                                      attn_mask=lower_right(n, m + n), enable_gqa=gqa)
                out = torch.cat([out, rest.view(b, s - 1, h, n, dv)], dim=1)
            past = None
        else:  # a carried state (some slots may be empty), or a cache longer than a segment: explicit masks
            past = state if state is not None else _empty_cache(self.cfg, b, m, k.device, k.dtype)
            span = (s - 1) * n + m  # segment j's cache is tokens [jN - M, jN) of [past; sequence]
            k_all = torch.cat([past.k.to(kd.dtype), kd], dim=2)[:, :, :span]
            v_all = torch.cat([past.v.to(vd.dtype), vd], dim=2)[:, :, :span]
            valid = torch.cat([past.valid, past.valid.new_ones(b, t)], dim=1)[:, :span]
            keys = torch.cat([rotary(windows(k_all, s), offset=0), ks.reshape(-1, hk, n, d)], dim=2)
            values = torch.cat([windows(v_all, s), vs.reshape(-1, hk, n, dv)], dim=2)
            out = self._masked(qs.reshape(-1, h, n, d), keys, values, valid.unfold(1, m, n).reshape(b * s, m), gqa)
            out = out.view(b, s, h, n, dv)
        out = out.transpose(1, 2).reshape(b, h, t, dv)
        return out, self._last(past, kd, vd)

    def _with_tail(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache | None, rotary,
                   kv_detached: tuple[Tensor, Tensor] | None) -> tuple[Tensor, KVCache]:
        """Whole segments (if any) through the fast path, then the partial last one against the mem_len tokens
        before it, the same rows the fast path caches (so with `cache: input` they pass gradients to W_k, W_v).
        Explicit rather than the base class's loop, whose read() and write() a subclass (Memorizing) overrides."""
        m, t = self.mem_len, q.shape[2]
        full = t - t % self.cfg.segment_len
        kd, vd = kv_detached if kv_detached is not None else (k.detach(), v.detach())
        outs = []
        if full:
            outs.append(TransformerXL.forward(self, q[:, :, :full], k[:, :, :full], v[:, :, :full], None, state,
                                              rotary, (kd[:, :, :full], vd[:, :, :full]))[0])
        ctx = Context(*self._window(state, kd[:, :, :full], vd[:, :, :full]))
        outs.append(local_attention(q[:, :, full:], k[:, :, full:], v[:, :, full:], rotary, ctx))
        return torch.cat(outs, dim=2), self._last(state, kd, vd)

    def _window(self, past: KVCache | None, kd: Tensor, vd: Tensor) -> KVCache:
        """The last mem_len tokens of [past; kd, vd] (`past` counts only where kd is shorter), not detached."""
        m, b, t = self.mem_len, kd.shape[0], kd.shape[2]
        if t >= m:
            return KVCache(kd[:, :, -m:], vd[:, :, -m:], torch.ones(b, m, dtype=torch.bool, device=kd.device))
        if past is None:
            past = _empty_cache(self.cfg, b, m, kd.device, kd.dtype)
        return KVCache(torch.cat([past.k.to(kd.dtype), kd], dim=2)[:, :, -m:],
                       torch.cat([past.v.to(vd.dtype), vd], dim=2)[:, :, -m:],
                       torch.cat([past.valid, past.valid.new_ones(b, t)], dim=1)[:, -m:])

    def _last(self, past: KVCache | None, kd: Tensor, vd: Tensor) -> KVCache:
        """The cache after the sequence: its last mem_len tokens, detached. (A new tuple rather than _replace,
        which torch 2.11's compiler cannot return from a compiled block.)"""
        window = self._window(past, kd, vd)
        return KVCache(window.k.detach(), window.v.detach(), window.valid)

    @staticmethod
    def _masked(q: Tensor, k: Tensor, v: Tensor, ctx_valid: Tensor, gqa: bool) -> Tensor:
        """Bottom-right causal attention with some cache slots masked: q (X, H, N, D), k (X, H_kv, M+N, D)."""
        n, m = q.shape[2], k.shape[2] - q.shape[2]
        causal = torch.ones(n, m + n, dtype=torch.bool, device=q.device).tril(m)  # (N, M+N)
        mask = causal.expand(q.shape[0], 1, n, m + n).clone()
        mask[..., :m] &= ctx_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """Table 1: (d_key + d_value) H N l, N the cached tokens; state in the activations' dtype (bf16)."""
        m = cls.resolve_mem_len(cfg, args)
        state = _kv_floats(cfg, cfg.n_kv_heads, m)
        return Footprint(_kv_floats(cfg, cfg.n_heads, m), state, 2 * state)

    @classmethod
    def work(cls, cfg, args: dict[str, Any], t: int, training: bool) -> Work:
        """A segment starting at token p sees min(mem_len, p) cached keys, then itself causally. With `cache:
        input`, training projects K and V again from the detached layer input over the whole sequence:
        2 t dim (d + d_v) H_kv per layer."""
        m = cls.resolve_mem_len(cfg, args)
        pairs = sum(causal_pairs(s, min(m, p)) for p, s in segment_spans(t, cfg.segment_len))
        recompute = cfg.n_layers * 2 * t * cfg.dim * 2 * cfg.head_dim * cfg.n_kv_heads
        return Work(pairs, t, recompute=float(recompute) if training and args["cache"] == "input" else 0.0)


@register_memory
class FullAttention(Memory):
    """Causal attention over the whole document; streaming keeps every key and value (the state grows)."""

    name = "full"
    whole_sequence = True
    capturable = False  # the cache grows every token

    def context(self, state: KVCache) -> Context:
        return Context(state.k, state.v, state.valid)

    def positions(self, t: int, state: KVCache | None) -> int:
        return t + (state.k.shape[2] if state is not None else 0)

    def write(self, state: KVCache | None, k: Tensor, v: Tensor) -> KVCache:
        valid = k.new_ones(k.shape[0], k.shape[2], dtype=torch.bool)
        if state is None:
            return KVCache(k.detach(), v.detach(), valid)
        return KVCache(torch.cat([state.k, k.detach()], dim=2), torch.cat([state.v, v.detach()], dim=2),
                       torch.cat([state.valid, valid], dim=1))

    def forward(self, q, k, v, gate, state, rotary, kv_detached=None):
        if state is None:  # from a document start: one causal SDPA (flash) over the whole sequence
            out = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = local_attention(q, k, v, rotary, self.context(state))
        return out, self.write(state, k, v)

    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """The whole KV cache: (d_key + d_value) H T l, growing with the length T."""
        state = _kv_floats(cfg, cfg.n_kv_heads, seq_len)
        return Footprint(_kv_floats(cfg, cfg.n_heads, seq_len), state, 2 * state)

"""Memorizing Transformers (Wu et al. 2022): Transformer-XL at every layer, and at one layer a kNN memory.

Every layer keeps the Transformer-XL cache (`memories.txl`). One layer (`knn_layer`, 1-indexed: 9 of 12 in the
paper) also keeps, per batch row and kv head, a FIFO ring buffer of the last `knn_size` keys and values it has
seen, never differentiated. Each segment first retrieves, then writes: every query takes its `top_k` best keys
among the valid slots (keys and queries L2-normalised, scaled by a learned per-head factor), a softmax over those
k pairs alone (no position bias) gives the memory's output, and a per-head gate, zero at initialisation, mixes it
with the local output (Eq. 10 of the Infini-attention paper, the same mix). Nothing valid: nothing read.
The kNN layer's local attention has no position encoding by default (the official configuration), RoPE as an
option.

The segment-parallel forward scores each segment's queries against the keys the store would hold at that
segment: the carried store (oldest first) followed by the sequence's own earlier keys, a contiguous window of
`knn_size` slots. Queries go in chunks so the score matrix stays (B, H_kv, 512, window); the softmax over the k
retrieved pairs saves their indices for the backward pass, not the gathered keys and values.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infini_bench.attention import Context, mix
from infini_bench.compressive import infini_attention
from infini_bench.errors import ConfigError, check_int
from infini_bench.memories.base import Footprint, Work, register_memory, segment_spans
from infini_bench.memories.txl import KVCache, TransformerXL, _empty_cache

CHUNK = 512  # query rows scored at once: the score matrix is (B, H_kv, CHUNK, window)


class KNNState(NamedTuple):
    """The kNN layer's state: its Transformer-XL cache and the ring buffer, all fixed shapes."""

    k: Tensor  # (B, H_kv, M, D) the XL cache, un-rotated
    v: Tensor  # (B, H_kv, M, D_v)
    valid: Tensor  # (B, M)
    knn_k: Tensor  # (B, H_kv, C, D) L2-normalised keys
    knn_v: Tensor  # (B, H_kv, C, D_v)
    knn_valid: Tensor  # (B, C) which slots hold a token
    ptr: Tensor  # (B,) int64: the slot written next (the oldest once the ring is full)


def no_rotary(x: Tensor, offset: int | Tensor = 0) -> Tensor:
    """RoPE's signature, no rotation: local attention without position encoding."""
    return x


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, H_kv, S, D), idx (B, H_kv, Q, k) slot indices -> the slots' rows (B, H_kv, Q, k, D)."""
    b, hk, s, d = x.shape
    base = torch.arange(b * hk, device=x.device).view(b, hk, 1, 1) * s
    return x.reshape(b * hk * s, d)[idx + base]


class TopKAttention(torch.autograd.Function):
    """Softmax attention of each query over its k retrieved pairs; rows with no hit read 0.

    The pairs are constants (stop-gradient): only q gets a gradient. The backward pass gathers them again from
    the indices, so what is saved is (B, H_kv, Q, k), not the k-times-larger gathered keys and values."""

    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, values: Tensor, idx: Tensor, hit: Tensor) -> Tensor:
        # q (B, H_kv, Q, D); keys (B, H_kv, S, D), values (B, H_kv, S, D_v); idx, hit (B, H_kv, Q, k).
        # At least fp32, autocast or not: under CUDA autocast einsum would run in bf16 and the backward would
        # mix bf16 and fp32 operands.
        ctx.q_dtype = q.dtype
        work = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(work)
            s = torch.einsum("bhqd,bhqkd->bhqk", q, _gather(keys, idx).to(work)).masked_fill(~hit, float("-inf"))
            top = s.amax(-1, keepdim=True)
            e = (s - torch.where(torch.isfinite(top), top, 0.0)).exp()  # exactly 0 where nothing was hit
            w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)  # (B, H_kv, Q, k)
            ctx.save_for_backward(keys, values, idx, w)
            return torch.einsum("bhqk,bhqkd->bhqd", w, _gather(values, idx).to(work))

    @staticmethod
    def backward(ctx, grad: Tensor):
        keys, values, idx, w = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(w.dtype)
            dw = torch.einsum("bhqd,bhqkd->bhqk", grad, _gather(values, idx).to(w.dtype))
            ds = w * (dw - (w * dw).sum(-1, keepdim=True))  # through the softmax
            dq = torch.einsum("bhqk,bhqkd->bhqd", ds, _gather(keys, idx).to(w.dtype))
        return dq.to(ctx.q_dtype), None, None, None, None


@torch.compiler.disable
def knn_attention(q: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor | None, top_k: int,
                  lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Each query's top_k keys among slots lo .. hi-1, then a softmax over those k pairs alone.

    q (B, H, L, D) normalised and scaled, fp32; keys (B, H_kv, S, D) normalised, values (B, H_kv, S, D_v);
    key_valid (B, S) or None (all valid). Returns (out (B, H, L, D_v) fp32, has (B, H, L, 1): anything valid).

    Always eager, also inside a compiled block (the block's graph breaks around it): compiled by inductor on an
    H200 (torch 2.11) at batch 8 x 8,192 tokens, the search-and-gather gave the same loss as eager but
    non-finite gradients (and, written with plain autograd ops instead of TopKAttention, gradients with a
    relative error of 2e5 in the kNN layer and below), while eager and batch 1 were right (docs/BENCHMARKS.md)."""
    b, h, length, d = q.shape
    hk = keys.shape[1]
    k = min(top_k, hi - lo)
    if k <= 0:
        return q.new_zeros(b, h, length, values.shape[-1]), torch.zeros(b, h, length, 1, dtype=torch.bool,
                                                                        device=q.device)
    rows = q.reshape(b, hk, (h // hk) * length, d)  # query heads grouped onto their kv head
    window = keys[:, :, lo:hi].transpose(-1, -2)  # (B, H_kv, D, W)
    outs, hits = [], []
    for start in range(0, rows.shape[2], CHUNK):
        qc = rows[:, :, start: start + CHUNK]  # (B, H_kv, c, D)
        with torch.no_grad():  # selection only: the scores that matter are recomputed in fp32 below
            scores = qc.to(keys.dtype) @ window  # (B, H_kv, c, W)
            if key_valid is not None:
                scores.masked_fill_(~key_valid[:, None, None, lo:hi], float("-inf"))
            best, idx = scores.topk(k, dim=-1)  # (B, H_kv, c, k): exact
        hit = best > float("-inf")
        outs.append(TopKAttention.apply(qc, keys, values, idx + lo, hit))
        hits.append(hit[..., :1])
    return torch.cat(outs, 2).view(b, h, length, -1), torch.cat(hits, 2).view(b, h, length, 1)


@register_memory
class MemorizingTransformer(TransformerXL):
    name = "memorizing"
    defaults = {"mem_len": None, "cache": "input", "knn_size": 65000, "eval_knn_size": None, "top_k": 32,
                "knn_layer": None, "knn_rope": False}

    def __init__(self, cfg, layer: int, args: dict[str, Any]):
        super().__init__(cfg, layer, args)
        self.knn_size, self.top_k, knn_layer, self.knn_rope = self.resolve_knn(cfg, args)
        self.eval_knn_size = self.resolve_eval_size(args)
        self.knn = layer == knn_layer - 1
        self.search = True  # False: the kNN layer reads nothing (generate.prefill, far before a prompt's end)
        self.gated = self.knn  # the gate (Eq. 10) sits at the kNN layer only
        # |scale| multiplies the cosine scores, per query head (normalised keys need a learned temperature).
        self.scale = nn.Parameter(torch.ones(cfg.n_heads)) if self.knn else None

    @staticmethod
    def resolve_knn(cfg, args: dict[str, Any]) -> tuple[int, int, int, bool]:
        """(knn_size, top_k, knn_layer 1-indexed, knn_rope), checked."""
        check_int("memory.knn_size", args["knn_size"], low=1)
        check_int("memory.top_k", args["top_k"], low=1)
        knn_layer = round(0.75 * cfg.n_layers) if args["knn_layer"] is None else args["knn_layer"]
        if not isinstance(knn_layer, int) or isinstance(knn_layer, bool) or not 1 <= knn_layer <= cfg.n_layers:
            raise ConfigError("memory.knn_layer", f"{knn_layer!r} must be a layer from 1 to {cfg.n_layers} "
                                                  "(model.n_layers), or null for 3/4 of the way up")
        if not isinstance(args["knn_rope"], bool):
            raise ConfigError("memory.knn_rope", f"{args['knn_rope']!r} must be true or false")
        return args["knn_size"], args["top_k"], knn_layer, args["knn_rope"]

    @staticmethod
    def resolve_eval_size(args: dict[str, Any]) -> int:
        """The store's slots outside training: memory.eval_knn_size, or knn_size when it is null."""
        if args.get("eval_knn_size") is None:
            return args["knn_size"]
        check_int("memory.eval_knn_size", args["eval_knn_size"], low=1)
        return args["eval_knn_size"]

    @property
    def capacity(self) -> int:
        """The store's slots: knn_size in training, eval_knn_size in eval mode. The store holds keys and values,
        no learned parameter, so its size may differ between the two; while a sequence fits both, they give the
        same output, so training needs no more slots than its longest sequence."""
        return self.knn_size if self.training else self.eval_knn_size

    def reset_parameters(self) -> None:
        if self.scale is not None:
            with torch.no_grad():
                self.scale.fill_(1.0)  # as the official code

    def active(self) -> bool:
        return self.knn or self.mem_len > 0

    def search_reach(self) -> int | None:
        """The store holds this layer's keys and values, made from its input, never from its search; the search
        changes this layer's output in its own segment, and each layer above carries that output on for the
        ceil(mem_len / N) segments its XL cache spans. So only the last 1 + (layers above) x ceil(mem_len / N)
        segments' searches can change what follows."""
        if not self.knn:
            return None
        return 1 + (self.cfg.n_layers - 1 - self.layer) * -(-self.mem_len // self.cfg.segment_len)

    def local_rotary(self, rotary):
        return no_rotary if self.knn and not self.knn_rope else rotary

    # ---- per-layer state -----------------------------------------------------------------------------------
    def context(self, state: KVCache | KNNState) -> Context | None:
        return Context(state.k, state.v, state.valid) if self.mem_len else None

    def _queries(self, q: Tensor) -> Tensor:
        """q (B, H, L, D) -> L2-normalised and scaled by |scale| per head, fp32."""
        return F.normalize(q.float(), dim=-1) * self.scale.float().abs().view(1, -1, 1, 1)

    def read(self, q: Tensor, state: KVCache | KNNState) -> tuple[Tensor, Tensor] | None:
        """The top_k slots of the ring for each query (L = 1 while decoding, or a whole segment)."""
        if not self.knn:
            return None
        return knn_attention(self._queries(q), state.knn_k, state.knn_v, state.knn_valid, self.top_k, 0,
                             state.knn_k.shape[2])

    def _cache(self, state: KNNState | None, k: Tensor, v: Tensor) -> KVCache:
        """The XL cache part of the state after k, v (zero-length when mem_len = 0)."""
        cache = super().write(KVCache(state.k, state.v, state.valid) if state is not None else None, k, v)
        return cache if cache is not None else _empty_cache(self.cfg, k.shape[0], 0, k.device, k.dtype)

    def _ring(self, state: KNNState | None, k: Tensor, v: Tensor, in_place: bool = False) -> KNNState:
        """The ring after a FIFO append of k (B, H_kv, L, D), v: the last min(L, C) tokens, from slot ptr on.
        in_place: written into `state`'s own tensors (streamed evaluation: a copy of every slot per segment is most
        of the cost of a store that holds a 1M-token prompt); only after anything that reads `state` has."""
        if state is None:
            state = self.empty_state(k.shape[0], k.device, k.dtype)
        b, hk, length, d = k.shape
        c = state.knn_k.shape[2]  # the store's own size: one made in eval mode keeps eval_knn_size
        take = min(length, c)
        slots = (state.ptr[:, None] + torch.arange(length - take, length, device=k.device)) % c  # (B, take)
        keys = F.normalize(k[:, :, length - take:].detach().float(), dim=-1).to(state.knn_k.dtype)
        values = v[:, :, length - take:].detach().to(state.knn_v.dtype)
        scatter = "scatter_" if in_place else "scatter"
        return KNNState(state.k, state.v, state.valid,
                        getattr(state.knn_k, scatter)(2, slots[:, None, :, None].expand(b, hk, take, d), keys),
                        getattr(state.knn_v, scatter)(2, slots[:, None, :, None].expand(b, hk, take, values.shape[-1]),
                                                      values),
                        getattr(state.knn_valid, scatter)(1, slots, True), (state.ptr + length) % c)

    @staticmethod
    def _with_cache(ring: KNNState, cache: KVCache) -> KNNState:
        """The ring's fields with another XL cache. (Built anew rather than with _replace, which torch 2.11's
        compiler cannot return from a compiled block.)"""
        return KNNState(cache.k, cache.v, cache.valid, ring.knn_k, ring.knn_v, ring.knn_valid, ring.ptr)

    def write(self, state: KVCache | KNNState | None, k: Tensor, v: Tensor) -> KVCache | KNNState | None:
        """The XL cache shifted; at the kNN layer the segment also appended to the ring (after it was read)."""
        if not self.knn:
            return super().write(state, k, v)
        return self._with_cache(self._ring(state, k, v, self._in_place()), self._cache(state, k, v))

    @staticmethod
    def _in_place() -> bool:
        """Whether ring writes go into the state's tensors: under inference mode (prefill, decoding), where a state
        is carried forward and never reused (the passkey evaluation deep-copies one before teacher forcing)."""
        return torch.is_inference_mode_enabled()

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache | KNNState | None:
        if not self.knn:
            return super().empty_state(batch, device, dtype)
        ring = _empty_cache(self.cfg, batch, self.capacity, device, dtype)  # the same three fields, C slots
        return KNNState(*_empty_cache(self.cfg, batch, self.mem_len, device, dtype), *ring,
                        torch.zeros(batch, dtype=torch.long, device=device))

    # ---- the whole-sequence forward --------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state: KVCache | KNNState | None,
                rotary, kv_detached: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        """Local attention as Transformer-XL's fast path; at the kNN layer every segment's retrieval from the
        store as it stood before that segment (the carried ring, oldest first, then the sequence's earlier keys:
        segment s sees the window of C slots that ends at its own start)."""
        n, t = self.cfg.segment_len, q.shape[2]
        if not self.knn:
            return super().forward(q, k, v, gate, state, rotary, kv_detached)
        # A partial last segment needs no fallback: its queries read the window that ends at its start like the
        # others, and the local part handles it. (Segment by segment, each write would rebuild the C-slot ring.)
        rot = self.local_rotary(rotary)
        if self.mem_len:
            cache = KVCache(state.k, state.v, state.valid) if state is not None else None
            local, cache = super().forward(q, k, v, None, cache, rot, kv_detached)
        else:
            local, _ = infini_attention(q, k, v, q.new_zeros(q.shape[1]), segment_len=n, rule="none", rotary=rot)
            cache = self._cache(None, k, v)
        if not self.search or (state is not None and t <= n):
            # One segment (streaming): the carried store as it stands, unordered, read before the segment's own
            # write, which may be in place; or, far before a prompt's end, written without a search (search_reach).
            read = self.read(q, state) if self.search else None
            return mix(local, read, gate, self.empty_read), self._with_cache(self._ring(state, k, v, self._in_place()),
                                                                            cache)
        new_state = self._with_cache(self._ring(state, k, v), cache)  # functional: the reads below need `state`
        c = new_state.knn_k.shape[2]
        keys = F.normalize(k.detach().float(), dim=-1).to(k.dtype)  # (B, H_kv, T, D)
        values = v.detach()
        if state is None:  # from a document start: the sequence's own keys only
            key_valid, offset = None, 0
        else:
            b, hk = k.shape[:2]
            order = (state.ptr[:, None] + torch.arange(c, device=k.device)) % c  # (B, C): oldest first
            keys = torch.cat([state.knn_k.gather(2, order[:, None, :, None].expand(b, hk, c, k.shape[-1])),
                              keys.to(state.knn_k.dtype)], dim=2)  # (B, H_kv, C + T, D)
            values = torch.cat([state.knn_v.gather(2, order[:, None, :, None].expand(b, hk, c, v.shape[-1])),
                                values.to(state.knn_v.dtype)], dim=2)
            key_valid = torch.cat([state.knn_valid.gather(1, order), state.knn_valid.new_ones(b, t)], dim=1)
            offset = c
        queries = self._queries(q)
        reads = [knn_attention(queries[:, :, i: i + n], keys, values, key_valid, self.top_k,
                               max(0, offset + i - c), offset + i) for i in range(0, t, n)]
        read = torch.cat([r[0] for r in reads], dim=2), torch.cat([r[1] for r in reads], dim=2)
        return mix(local, read, gate, self.empty_read), new_state

    # ---- Table 1 ---------------------------------------------------------------------------------------------
    @classmethod
    def footprint(cls, cfg, args: dict[str, Any], seq_len: int) -> Footprint:
        """Table 1: the XL caches plus (d_key + d_value) H C for the store (eval_knn_size slots where it is set);
        the state counts what is filled."""
        args = {**cls.defaults, **args}
        xl = super().footprint(cfg, args, seq_len)
        c = cls.resolve_eval_size(args)  # the store a sequence is evaluated with
        per_entry = 2 * cfg.head_dim
        state = xl.state_floats + per_entry * cfg.n_kv_heads * min(c, seq_len)
        return Footprint(xl.paper_floats + per_entry * cfg.n_heads * c, state, 2 * state)

    @classmethod
    def work(cls, cfg, args: dict[str, Any], t: int, training: bool) -> Work:
        """Transformer-XL's, and at the kNN layer from an empty store the search and the top-k attention.

        Selection: each query head's query scored against the W = min(knn_size, p) valid slots of its window (a
        segment starting at token p searches every earlier token, at most knn_size), 2 d W. Top-k attention over
        k = min(top_k, W) pairs: the scores again 2 d k, the value sum 2 d_v k, and the softmax counted as 4 k
        (subtract, exp, sum, divide: an approximation; the top-k selection itself is comparisons, not counted).
        Streamed with a carried store the search also scores the store's still-empty slots (masked): those are
        not counted, so early segments of a stream execute more than this."""
        args = {**cls.defaults, **args}
        c, top_k, _, _ = cls.resolve_knn(cfg, args)
        d, h = cfg.head_dim, cfg.n_heads
        select = topk = 0
        for p, s in segment_spans(t, cfg.segment_len):
            w = min(c, p)
            k = min(top_k, w)
            select += h * s * 2 * d * w
            topk += h * s * (4 * d * k + 4 * k)
        return super().work(cfg, args, t, training)._replace(memory=float(topk), selection=float(select))

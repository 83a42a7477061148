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

A partial last segment is processed like a full one, its write rows right after its L tokens, as training
does with a shorter tail; the memory returned after it summarises that partial segment. So a sequence split
at segment boundaries (`model.stream`, evaluation, `model(ids[:, :2N])` then the rest) equals one call.
Decoding: a segment's read rows run once, at its first token, and their keys and values fill the first m
slots of each layer's cache; text tokens follow at m, m + 1, ...; when the segment is full its write rows run
over [read; text] from the cache, which gives the next memory. Write rows do not change the text outputs of
their own segment, so this equals the parallel forward.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infini_bench.errors import ConfigError, check_int
from infini_bench.memories.base import (Context, Footprint, Memory, Work, causal_pairs, local_attention, lower_right,
                                        register_memory, segment_spans)


class Rows(NamedTuple):
    """What one layer's attention needs for a run of rows: keys and values before them, and their own mask."""

    ctx: Context | None  # keys (B, H_kv, M, D) un-rotated at positions 0 .. M-1, or None
    visible: Tensor | None  # (L, L) bool: which of the rows' own keys each row sees
    # Instead of visible: (m, causal) of `segment_mask`, the text length read from the rows' shape (an int here
    # would be a constant of the compiled block, one trace per partial segment length).
    segment: tuple[int, bool] | None = None


def check_args(args: dict[str, Any]) -> None:
    """num_mem_tokens and bptt_depth integers >= 0, causal and checkpoint_segments booleans."""
    check_int("memory.num_mem_tokens", args["num_mem_tokens"])
    check_int("memory.bptt_depth", args["bptt_depth"])
    for key in ("causal", "checkpoint_segments"):
        if not isinstance(args[key], bool):
            raise ConfigError(f"memory.{key}", f"{args[key]!r} is not one of true, false")


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


@register_memory
class RecurrentMemory(Memory):
    """The per-layer part: local attention over the rows it is given, with their mask; no state of its own."""

    name = "rmt"
    defaults = {"num_mem_tokens": 100, "causal": False, "bptt_depth": 0, "checkpoint_segments": False}
    model_level = True
    capturable = False  # a segment end runs the write rows through the stack: decoded eagerly

    def active(self) -> bool:
        return False  # nothing per layer: the memory is carried by the stack

    def positions(self, t: int, state) -> int:
        return 2 * self.args["num_mem_tokens"] + self.cfg.segment_len  # [read; text; write]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate, state: Rows, rotary,
                kv_detached=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The rows' attention -> (B, H, L, D_v) and their keys and values (for the decoding cache)."""
        if state.segment is not None:
            m, causal = state.segment
            length = q.shape[2] - 2 * m
            return rows_attention(q, k, v, rotary, m, length, causal, length == self.cfg.segment_len), (k, v)
        return local_attention(q, k, v, rotary, state.ctx, visible=state.visible), (k, v)

    @classmethod
    def build_stack(cls, cfg, args: dict[str, Any]) -> nn.Module:
        check_args(args)
        return MemoryTokens(cfg, args)

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


class MemoryTokens(nn.Module):
    """The model-level part: M_0 and the segment loop. States are the memory vectors (B, m, dim), None = M_0."""

    def __init__(self, cfg, args: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.m, self.causal = args["num_mem_tokens"], args["causal"]
        self.bptt_depth, self.checkpoint_segments = args["bptt_depth"], args["checkpoint_segments"]
        self.initial = nn.Parameter(torch.empty(self.m, cfg.dim))  # M_0 (m, dim)
        self._segment = MemoryTokens.segment  # or its compiled version (compile_segments)

    def compile_segments(self, **options) -> None:
        """torch.compile one segment through the whole stack as one graph (`options` go to torch.compile).

        Segments are sequential and each is a small amount of work for a GPU (N + 2m rows through every block),
        so compiling block by block leaves the step bound by the host: one compiled call, with its guards and
        wrappers, per block, segment and direction. One graph per segment makes that 12x fewer calls."""
        self._segment = torch.compile(MemoryTokens.segment, **options)

    def reset_parameters(self) -> None:
        """Independent random rows: identical rows would stay identical through every layer."""
        nn.init.normal_(self.initial, std=0.02)

    def start(self, batch: int) -> Tensor:
        return self.initial.unsqueeze(0).expand(batch, -1, -1)  # (B, m, dim)

    def memory_mask(self, device: torch.device) -> Tensor:
        """(m, m): how the read rows, and the write rows, see each other."""
        return segment_mask(self.m, 0, self.causal, device)[: self.m, : self.m]

    def run_rows(self, model, x: Tensor, contexts: list[Context | None], visible: Tensor | None,
                 segment: tuple[int, bool] | None = None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Rows x (B, L, dim) through every block -> the final-norm output and each layer's keys and values.
        The rows see each other as `visible` says, or as a whole segment's rows (`Rows.segment`)."""
        kvs = []
        for layer, ctx in zip(model.layers, contexts):
            x, kv = layer(x, Rows(ctx, visible, segment), model.rotary)
            kvs.append(kv)
        return model.norm(x), kvs

    def segment(self, model, text: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """text (B, L, dim) embedded, memory (B, m, dim) -> text outputs (B, L, dim), next memory (B, m, dim)."""
        m, length = self.m, text.shape[1]
        memory = memory.to(text.dtype)
        h, _ = self.run_rows(model, torch.cat([memory, text, memory], dim=1), [None] * len(model.layers), None,
                             (m, self.causal))
        return h[:, m: m + length], h[:, m + length:]

    def hidden(self, model, input_ids: Tensor, states: Tensor | None, cache: list | None = None,
               pos: int = 0) -> tuple[Tensor, Tensor | None]:
        """input_ids (B, T) -> final-norm text outputs (B, T, dim) and the memory after them (see model.hidden)."""
        if cache is not None:
            return self.decode(model, input_ids, states, cache, pos), states
        n = model.cfg.segment_len
        x = model.embed(input_ids)  # (B, T, dim)
        memory = self.start(x.shape[0]) if states is None else states
        recompute = model.training and torch.is_grad_enabled() and (
            model.cfg.activation_checkpointing or self.checkpoint_segments)
        if self.m and not self.causal:
            lower_right(n, self.m + n)  # a full segment's text rows' mask (rows_attention), made uncompiled
        outs = []
        for i, start in enumerate(range(0, x.shape[1], n)):
            text = x[:, start: start + n]
            if recompute:
                h, memory = checkpoint(self._segment, self, model, text, memory, use_reentrant=False)
            else:
                h, memory = self._segment(self, model, text, memory)
            outs.append(h)
            if self.bptt_depth and (i + 1) % self.bptt_depth == 0:  # truncated BPTT (counted within this call)
                memory = memory.detach()
        return torch.cat(outs, dim=1), memory

    def decode(self, model, input_ids: Tensor, states: Tensor | None, cache: list, pos: int) -> Tensor:
        """input_ids (B, L) at text positions pos .. of the current segment -> final-norm outputs (B, L, dim)."""
        m = self.m
        if pos == 0 and m:  # the segment's first tokens: its read rows go into cache slots 0 .. m-1
            memory = self.start(input_ids.shape[0]) if states is None else states
            _, kvs = self.run_rows(model, memory.to(model.embed.weight.dtype), [None] * len(model.layers),
                                   self.memory_mask(input_ids.device))
            for c, (k, v) in zip(cache, kvs):
                c.k[:, :, :m] = k
                c.v[:, :, :m] = v
        x = model.embed(input_ids)
        for layer, c in zip(model.layers, cache):
            # Causal over the cache from slot m + pos: every read row, the text so far, no write row.
            x, _ = layer(x, None, model.rotary, c, pos + m)
        return model.norm(x)

    def new_decode_state(self, model, batch: int):
        """Caches of m + N slots per layer (read rows, then the segment's text) and no memory yet."""
        from infini_bench.generate import DecodeState  # generate imports the model, which imports this module
        from infini_bench.model import LocalCache
        cfg, p = model.cfg, model.embed.weight
        shape = (batch, cfg.n_kv_heads, self.m + cfg.segment_len, cfg.head_dim)
        cache = [LocalCache(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.n_layers)]
        return DecodeState(None, cache)

    def end_decode_segment(self, model, state) -> None:
        """The segment is full: its write rows run over [read; text] from the caches and give the next memory."""
        if not self.m:
            return
        batch, slots = state.cache[0].k.shape[0], state.cache[0].k.shape[2]
        memory = self.start(batch) if state.states is None else state.states
        valid = torch.ones(batch, slots, dtype=torch.bool, device=memory.device)
        contexts = [Context(c.k, c.v, valid) for c in state.cache]  # read rows + the full segment, all seen
        state.states, _ = self.run_rows(model, memory.to(model.embed.weight.dtype), contexts,
                                        self.memory_mask(memory.device))

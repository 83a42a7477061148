"""Streaming generation: constant-memory prompt encoding, then one token at a time with a one-segment KV cache.

The decoder state holds, per layer, the memory state written by every finished segment (whatever the memory:
Infini-attention's M and z, Transformer-XL's cache, ...) and the keys and values of the *current* segment
(at most `segment_len` tokens, preallocated). New tokens go through the model's own blocks with that cache
(`SegmentTransformer.hidden(..., cache=, pos=)`), so decoding shares one definition of the block with training.
When the segment fills up, each layer's memory writes it exactly as the segment-parallel path does, and the
cache starts over. So the logits of prefill + decode equal one parallel forward over the same tokens.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from infini_bench.blocks import LocalCache
from infini_bench.model import SegmentTransformer


@dataclass
class DecodeState:
    """Everything a decoder needs to continue a sequence (constant size unless the memory grows, as full's)."""

    states: list[Any]  # per layer: the memory state after the finished segments (None: nothing yet)
    cache: list[LocalCache]  # per layer: keys and values of the current segment
    pos: int = 0  # tokens of the current segment already in the caches, 0 <= pos < segment_len
    length: int = 0  # tokens consumed so far


class Generation(NamedTuple):
    tokens: list[list[int]]  # new tokens per batch row, EOS excluded
    hit_eos: list[bool]  # whether each row stopped at EOS (else at max_new_tokens)
    logits: Tensor | None  # (B, steps, V) logits each new token was drawn from, with return_logits


def _rows(x: Any, rows: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x.index_select(0, rows.to(x.device))
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a memory's NamedTuple
        return type(x)(*(_rows(v, rows) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_rows(v, rows) for v in x)
    return x  # None


def select_rows(state: DecodeState, rows: list[int]) -> DecodeState:
    """A new state holding batch rows `rows` of `state` (every tensor of a state is batch-first), in that order:
    rows that share a prefix go through it as one batch, then each goes on with its own tokens."""
    index = torch.tensor(rows, dtype=torch.long)
    return DecodeState(_rows(state.states, index), _rows(state.cache, index), state.pos, state.length)


def new_state(model: SegmentTransformer, batch_size: int = 1) -> DecodeState:
    """An empty decoder state: no memory, caches preallocated to one segment (fixed shapes, CUDA-graph friendly),
    after the slots of a stack memory's rows."""
    cfg, stack = model.cfg, model.stack_memory
    p = model.embed.weight
    shape = (batch_size, cfg.n_kv_heads, (stack.rows if stack is not None else 0) + cfg.segment_len, cfg.head_dim)
    cache = [LocalCache(torch.zeros(shape, dtype=p.dtype, device=p.device),
                        torch.zeros(shape, dtype=p.dtype, device=p.device)) for _ in range(cfg.n_layers)]
    if cfg.token_shift:  # the previous token's embedding, for the shift of the next one
        cache[0] = cache[0]._replace(prev=torch.zeros(batch_size, 1, cfg.dim, dtype=p.dtype, device=p.device))
    return DecodeState(None if stack is not None else [None] * cfg.n_layers, cache)


def _end_segment(model: SegmentTransformer, state: DecodeState) -> None:
    """The segment is full: the memory takes it in (model.end_segment) and the cache starts over."""
    state.states = model.end_segment(state.states, state.cache)
    state.pos = 0


def _extend(model: SegmentTransformer, ids: Tensor, state: DecodeState, last_only: bool) -> Tensor:
    """Feed ids (B, L) that fit in the current segment through the cached path; returns logits (B, L or 1, V)."""
    n = model.cfg.segment_len
    pos, length = state.pos, ids.shape[1]
    assert pos + length <= n, "a chunk must not cross a segment boundary"
    h, _ = model.hidden(ids, state.states, cache=state.cache, pos=pos)
    state.pos, state.length = pos + length, state.length + length
    if state.pos == n:
        _end_segment(model, state)
    return model.lm_head(h[:, -1:] if last_only else h)


@torch.inference_mode()
def feed(model: SegmentTransformer, ids: Tensor, state: DecodeState, last_only: bool = True) -> Tensor:
    """Consume ids (B, T) of any length, continuing `state` in place; returns logits (B, 1 or T, V).

    Whole segments that start at a boundary go through the model's own segment-parallel forward (one
    segment at a time, so memory stays constant however long `ids` is); a partial segment at either end
    goes through the KV cache. With last_only, only the last position's logits are kept.
    """
    n = model.cfg.segment_len
    device = model.embed.weight.device
    out: list[Tensor] = []
    start, t = 0, ids.shape[1]
    while start < t:
        if state.pos == 0 and t - start >= n:
            res = model(ids[:, start: start + n].to(device), state.states, last_only=last_only)
            state.states = res.states
            state.length += n
            logits, start = res.logits, start + n
        else:
            stop = min(t, start + n - state.pos)
            logits = _extend(model, ids[:, start:stop].to(device), state, last_only)
            start = stop
        out = [logits] if last_only else out + [logits]
    return torch.cat(out, dim=1)


def prefill(model: SegmentTransformer, input_ids: Tensor) -> tuple[Tensor, DecodeState]:
    """Encode a prompt (B, T) in constant memory; returns the last position's logits (B, V) and the state.

    A search that feeds only the layers above it (Memorizing's kNN layer, `Memory.search_reach`) runs for the
    prompt's last segments only, those that can change the last logits or anything decoded after them; earlier
    segments are still written to the store. The logits and state returned are the same as with every search
    (tests/test_generate.py), and a 1M-token prompt no longer searches a million-token store 1M / N times."""
    t, n = input_ids.shape[1], model.cfg.segment_len
    if t == 0:
        raise ValueError("the prompt is empty: generation needs at least one token (e.g. BOS)")
    state = new_state(model, input_ids.shape[0])
    reaches = {b.attn.memory: r for b in model.layers if (r := b.attn.memory.search_reach()) is not None}
    skip = max(0, (t - 1) // n - max(reaches.values()) + 1) * n if reaches else 0  # whole segments before the last
    if skip:
        for memory in reaches:
            memory.search = False
        try:
            feed(model, input_ids[:, :skip], state)
        finally:
            for memory in reaches:
                memory.search = True
    return feed(model, input_ids[:, skip:], state)[:, -1], state


@torch.inference_mode()
def decode_step(model: SegmentTransformer, token: Tensor, state: DecodeState) -> Tensor:
    """One new token per row, token (B,) -> logits of the next one (B, V); updates `state` in place."""
    return _extend(model, token.view(-1, 1).to(model.embed.weight.device), state, last_only=True)[:, -1]


def _copy_into(fixed: Any, value: Any) -> None:
    """Copy a memory state (a NamedTuple of tensors) into preallocated buffers of the same shapes."""
    for dst, src in zip(fixed, value):
        dst.copy_(src)


class StaticDecoder:
    """decode_step with fixed shapes and addresses, so that on a GPU one step is captured as a CUDA graph and
    replayed for every token: one launch instead of several hundred small kernels, which is what an eager
    step of a 1B model spends its time on at batch 1 (docs/BENCHMARKS.md, decode section).

    The step runs the model's blocks over the whole one-segment cache with a mask up to the current position
    (the position lives on the device), reading each layer's memory from fixed buffers that hold an empty
    state until a segment is finished (the memory's `empty_state`; reads of it fall back to local attention).
    Once every N tokens the finished segment is written outside the graph, as decode_step does, and copied into
    the buffers. A memory whose state grows (full attention) cannot be captured: it decodes eagerly, with a
    warning. It owns `state` while it decodes: feed it no other way.
    """

    def __init__(self, model: SegmentTransformer, state: DecodeState, graph: bool | None = None):
        cfg = model.cfg
        self.model, self.state = model, state
        device = model.embed.weight.device
        batch = state.cache[0].k.shape[0] if state.cache else 1
        self.eager = not all(b.attn.memory.capturable for b in model.layers) or model.stack_memory is not None
        if self.eager:
            if graph:
                warnings.warn(f"memory={cfg.memory} cannot be captured as a CUDA graph: decoding eagerly")
            self.graph = None
            return
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        dtype = model.embed.weight.dtype
        self.fixed = [b.attn.memory.empty_state(batch, device, dtype) for b in model.layers]
        self._sync_memory()
        model.fill_rotary(cfg.segment_len, None)
        self.graph = None
        self._warm_up_and_capture(graph if graph is not None else device.type == "cuda")

    def _sync_memory(self) -> None:
        """The buffers the step reads take the memory written so far (they stay empty before any write)."""
        for fixed, real in zip(self.fixed, self.state.states):
            if fixed is not None and real is not None:
                _copy_into(fixed, real)

    @torch.inference_mode()
    def _warm_up_and_capture(self, capture: bool) -> None:
        """Two steps (kernel selection, lazy inits; on a side stream, as capturing needs), then the capture.
        They write the caches at the *next* position only, which the first real step overwrites before
        anything reads it (the token shift's previous embedding, which they overwrite too, is put back after
        them); they run on the CPU too, so the tests cover that."""
        self.pos.fill_(self.state.pos)
        carried = self.state.cache[0].prev
        kept = carried.clone() if carried is not None else None
        side = torch.cuda.Stream() if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(2):
                self._step()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        if kept is not None:
            carried.copy_(kept)
        if side is not None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def _step(self) -> Tensor:
        model = self.model
        h, _ = model.hidden(self.token, self.fixed, cache=self.state.cache, pos=self.pos)
        return model.lm_head(h)[:, -1]

    @torch.inference_mode()
    def step(self, token: Tensor) -> Tensor:
        """One new token per row, token (B,) -> logits of the next one (B, V); advances the state."""
        state = self.state
        if self.eager:
            return decode_step(self.model, token, state)
        self.token.copy_(token.view(-1, 1))
        self.pos.fill_(state.pos)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        else:
            logits = self._step()
        state.pos, state.length = state.pos + 1, state.length + 1
        if state.pos == self.model.cfg.segment_len:  # the segment is finished: write it, as decode_step does
            _end_segment(self.model, state)
            self._sync_memory()
        return logits


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= top_p  # never drops the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float, top_p: float, greedy: bool,
           generator: torch.Generator | None) -> Tensor:
    """Next tokens (B,) from logits (B, V): argmax when greedy, else temperature then top-p sampling."""
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: SegmentTransformer,
    prompt_ids: Tensor,
    max_new_tokens: int = 1024,
    *,
    temperature: float = 0.5,
    top_p: float = 0.95,
    greedy: bool = False,
    eos_id: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
    cuda_graph: bool | None = None,
) -> Generation:
    """Continue prompts (B, T) of equal length; the paper decodes with temperature 0.5, top-p 0.95, 1024 steps.

    The prompt is encoded by `prefill`, then decoded by `generate_from`.
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    logits, state = prefill(model, prompt_ids)
    return generate_from(model, logits, state, max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                         eos_id=eos_id, seed=seed, return_logits=return_logits, cuda_graph=cuda_graph)


@torch.inference_mode()
def generate_from(
    model: SegmentTransformer,
    logits: Tensor,
    state: DecodeState,
    max_new_tokens: int,
    *,
    temperature: float = 0.5,
    top_p: float = 0.95,
    greedy: bool = False,
    eos_id: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
    cuda_graph: bool | None = None,
) -> Generation:
    """Continue a prefilled `state` whose next-token logits (B, V) are `logits`, so that a caller can also use the
    prompt's state otherwise (passkey scores a teacher-forced answer from a copy of it).

    Rows stop at `eos_id` or after `max_new_tokens`; sampling is reproducible by `seed`. Decoding runs through
    a StaticDecoder, which owns `state` from then on, captured as a CUDA graph on a GPU unless cuda_graph=False.
    """
    b = logits.shape[0]
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = StaticDecoder(model, state, graph=cuda_graph) if max_new_tokens > 1 else None
    tokens: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    steps: list[Tensor] = []
    for i in range(max_new_tokens):
        if return_logits:
            steps.append(logits.float().cpu())
        nxt = sample(logits, temperature, top_p, greedy, generator)
        for row, tok in enumerate(nxt.tolist()):
            if done[row]:
                continue
            if tok == eos_id:
                done[row] = True
            else:
                tokens[row].append(tok)
        if all(done) or i == max_new_tokens - 1:
            break
        logits = decoder.step(nxt)
    return Generation(tokens, done, torch.stack(steps, dim=1) if return_logits and steps else None)

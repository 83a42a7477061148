"""Streaming generation: constant-memory prompt encoding, then one token at a time with a one-segment KV cache.

The decoder state holds, per layer, the compressive memory written by every finished segment and a KV cache
of the *current* segment only (at most `segment_len` tokens, preallocated). A token at position p of its
segment attends to the cached keys 0..p with RoPE offset p (positions restart at 0 in every segment, as in
the parallel path) and reads the memory of earlier segments (Eq. 7). When the segment fills up, it is written
to the memory (Eq. 8 or 9) exactly as the segment-parallel path writes it, and the cache is cleared. So the
logits of prefill + decode equal one parallel forward over the same tokens, and the cost of a step does not
grow with the context: the cache never holds more than one segment.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infini_bench.attention import MemoryState, memory_read, memory_write
from infini_bench.model import InfiniAttentionLayer, InfiniTransformer, Rotary


@dataclass
class LayerCache:
    """One layer's view of the past: memory of finished segments, keys and values of the current one."""

    memory: MemoryState | None  # None: no segment finished yet (or rule 'none')
    k_rot: Tensor  # (B, H_kv, N, D) keys rotated at their position in the segment, for local attention
    k: Tensor  # (B, H_kv, N, D) un-rotated keys, for the memory write
    v: Tensor  # (B, H_kv, N, D_v)


@dataclass
class DecodeState:
    """Everything a decoder needs to continue a sequence: constant size in the sequence length."""

    layers: list[LayerCache]
    pos: int = 0  # tokens of the current segment already in the caches, 0 <= pos < segment_len
    length: int = 0  # tokens consumed so far


class Generation(NamedTuple):
    tokens: list[list[int]]  # new tokens per batch row, EOS excluded
    hit_eos: list[bool]  # whether each row stopped at EOS (else at max_new_tokens)
    logits: Tensor | None  # (B, steps, V) logits each new token was drawn from, with return_logits


def new_state(model: InfiniTransformer, batch_size: int = 1) -> DecodeState:
    """An empty decoder state: no memory, caches preallocated to one segment (fixed shapes, CUDA-graph friendly)."""
    cfg = model.cfg
    p = model.embed.weight
    shape = (batch_size, cfg.n_kv_heads, cfg.segment_len, cfg.head_dim)

    def buf() -> Tensor:
        return torch.zeros(shape, dtype=p.dtype, device=p.device)

    return DecodeState([LayerCache(None, buf(), buf(), buf()) for _ in range(cfg.n_layers)])


def _attend(attn: InfiniAttentionLayer, x: Tensor, cache: LayerCache, pos: int, rotary: Rotary) -> Tensor:
    """Infini-attention for L new tokens at segment positions pos .. pos+L-1, against the cached segment.

    x (B, L, dim) -> (B, L, dim). Writes the new keys and values into the cache.
    """
    b, length, _ = x.shape
    q, k, v = attn.qkv(x)  # (B, H, L, D), (B, H_kv, L, D), (B, H_kv, L, D_v)
    end = pos + length
    cache.k_rot[:, :, pos:end] = rotary(k, offset=pos)
    cache.k[:, :, pos:end] = k
    cache.v[:, :, pos:end] = v
    keys, values = cache.k_rot[:, :, :end], cache.v[:, :, :end]  # (B, H_kv, end, D)
    mask = None
    if length > 1:  # query i sits at segment position pos + i and sees keys 0 .. pos + i (Eq. 6, causal)
        rows = torch.arange(pos, end, device=x.device)[:, None]
        mask = torch.arange(end, device=x.device)[None, :] <= rows  # (L, end)
    a_dot = F.scaled_dot_product_attention(rotary(q, offset=pos), keys, values, attn_mask=mask,
                                           enable_gqa=q.shape[1] != k.shape[1])  # (B, H, L, D_v)
    if cache.memory is None:  # start of the document (or rule 'none'): A = A_dot
        out = a_dot
    else:
        a_mem = memory_read(q, cache.memory)  # Eq. 7, un-rotated q, fp32
        gate = torch.sigmoid(attn.gate.float()).view(1, -1, 1, 1)
        out = (gate * a_mem + (1.0 - gate) * a_dot.float()).to(q.dtype)  # Eq. 10
    return attn.wo(out.transpose(1, 2).reshape(b, length, -1))  # Eq. 11


def _extend(model: InfiniTransformer, ids: Tensor, state: DecodeState, last_only: bool) -> Tensor:
    """Feed ids (B, L) that fit in the current segment through the cached path; returns logits (B, L or 1, V)."""
    n = model.cfg.segment_len
    pos, length = state.pos, ids.shape[1]
    assert pos + length <= n, "a chunk must not cross a segment boundary"
    x = model.embed(ids)
    for block, cache in zip(model.layers, state.layers):
        x = x + _attend(block.attn, block.attn_norm(x), cache, pos, model.rotary)
        x = x + block.ffn(block.ffn_norm(x))
    h = model.norm(x[:, -1:] if last_only else x)
    state.pos, state.length = pos + length, state.length + length
    if state.pos == n:  # the segment is finished: write it to memory as the parallel path would, clear the cache
        if model.cfg.memory != "none":
            for cache in state.layers:
                cache.memory = memory_write(cache.k, cache.v, model.cfg.memory, cache.memory)
        state.pos = 0
    return model.lm_head(h)


@torch.inference_mode()
def feed(model: InfiniTransformer, ids: Tensor, state: DecodeState, last_only: bool = True) -> Tensor:
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
            seg = ids[:, start: start + n].to(device)
            res = model(seg, [c.memory for c in state.layers], last_only=last_only)
            for cache, memory in zip(state.layers, res.states):
                cache.memory = memory
            state.length += n
            logits, start = res.logits, start + n
        else:
            stop = min(t, start + n - state.pos)
            logits = _extend(model, ids[:, start:stop].to(device), state, last_only)
            start = stop
        out = [logits] if last_only else out + [logits]
    return torch.cat(out, dim=1)


def prefill(model: InfiniTransformer, input_ids: Tensor) -> tuple[Tensor, DecodeState]:
    """Encode a prompt (B, T) in constant memory; returns the last position's logits (B, V) and the state."""
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: generation needs at least one token (e.g. BOS)")
    state = new_state(model, input_ids.shape[0])
    return feed(model, input_ids, state)[:, -1], state


@torch.inference_mode()
def decode_step(model: InfiniTransformer, token: Tensor, state: DecodeState) -> Tensor:
    """One new token per row, token (B,) -> logits of the next one (B, V); updates `state` in place."""
    return _extend(model, token.view(-1, 1).to(model.embed.weight.device), state, last_only=True)[:, -1]


class StaticDecoder:
    """decode_step with fixed shapes and addresses, so that on a GPU one step is captured as a CUDA graph and
    replayed for every token: one launch instead of several hundred small kernels, which is what an eager
    step of a 1B model spends its time on at batch 1 (docs/BENCHMARKS.md, decode section).

    The step attends over the whole one-segment KV cache with a mask up to the current position, and reads
    the memory from fixed buffers, with a flag for "no segment finished yet" (then A = A_dot, as in
    decode_step). The position lives on the device. Once every N tokens the finished segment is written to
    memory outside the graph, as decode_step does. It owns `state` while it decodes: feed it no other way.
    """

    def __init__(self, model: InfiniTransformer, state: DecodeState, graph: bool | None = None):
        cfg = model.cfg
        self.model, self.state = model, state
        device = model.embed.weight.device
        batch = state.layers[0].k.shape[0]
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(cfg.segment_len, device=device)
        self.has_memory = torch.tensor(state.layers[0].memory is not None, device=device)
        self.memory: list[MemoryState] = []
        for cache in state.layers:
            shape_m = (batch, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)
            fixed = MemoryState(torch.zeros(shape_m, dtype=torch.float32, device=device),
                                torch.zeros(shape_m[:3], dtype=torch.float32, device=device))
            if cache.memory is not None:
                fixed.M.copy_(cache.memory.M)
                fixed.z.copy_(cache.memory.z)
                cache.memory = fixed
            self.memory.append(fixed)
        model.rotary.table(cfg.segment_len, device)
        self.graph = None
        self._warm_up_and_capture(graph if graph is not None else device.type == "cuda")

    @torch.inference_mode()
    def _warm_up_and_capture(self, capture: bool) -> None:
        """Two steps (kernel selection, lazy inits; on a side stream, as capturing needs), then the capture.
        They write the caches at the *next* position only, which the first real step overwrites before
        anything reads it; they run on the CPU too, so the tests cover that."""
        self.pos.fill_(self.state.pos)
        side = torch.cuda.Stream() if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(2):
                self._step()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def _step(self) -> Tensor:
        model, cfg = self.model, self.model.cfg
        x = model.embed(self.token)
        b = x.shape[0]
        visible = (self.slots <= self.pos).view(1, 1, 1, -1)  # slots 0 .. pos of the current segment
        at = self.pos.view(1)
        for block, cache, memory in zip(model.layers, self.state.layers, self.memory):
            attn = block.attn
            q, k, v = attn.qkv(block.attn_norm(x))
            cache.k_rot.index_copy_(2, at, model.rotary(k, offset=self.pos))
            cache.k.index_copy_(2, at, k)
            cache.v.index_copy_(2, at, v)
            out = F.scaled_dot_product_attention(model.rotary(q, offset=self.pos), cache.k_rot, cache.v,
                                                 attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1])
            if cfg.memory != "none":
                gate = torch.sigmoid(attn.gate.float()).view(1, -1, 1, 1)
                mixed = gate * memory_read(q, memory) + (1.0 - gate) * out.float()  # Eq. 10
                out = torch.where(self.has_memory, mixed, out.float()).to(q.dtype)
            x = x + attn.wo(out.transpose(1, 2).reshape(b, 1, -1))
            x = x + block.ffn(block.ffn_norm(x))
        return model.lm_head(model.norm(x))[:, -1]

    @torch.inference_mode()
    def step(self, token: Tensor) -> Tensor:
        """One new token per row, token (B,) -> logits of the next one (B, V); advances the state."""
        state, cfg = self.state, self.model.cfg
        self.token.copy_(token.view(-1, 1))
        self.pos.fill_(state.pos)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        else:
            logits = self._step()
        state.pos, state.length = state.pos + 1, state.length + 1
        if state.pos == cfg.segment_len:  # the segment is finished: write it to memory, as decode_step does
            if cfg.memory != "none":
                for cache, fixed in zip(state.layers, self.memory):
                    written = memory_write(cache.k, cache.v, cfg.memory, cache.memory)
                    fixed.M.copy_(written.M)
                    fixed.z.copy_(written.z)
                    cache.memory = fixed
                self.has_memory.fill_(True)
            state.pos = 0
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
    model: InfiniTransformer,
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

    Rows stop at `eos_id` or after `max_new_tokens`; sampling is reproducible by `seed`. Decoding runs through
    a StaticDecoder, captured as a CUDA graph on a GPU unless cuda_graph=False.
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    b = prompt_ids.shape[0]
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    logits, state = prefill(model, prompt_ids)
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

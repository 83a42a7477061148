"""A Llama-style decoder whose attention layers carry a memory across segments (Infini-attention or a baseline).

RMSNorm, RoPE on the local attention only, SwiGLU, GQA, optional tied embeddings. Sizes are named flavours
in `FLAVOURS` (`infini_bench.model_config`); the memory is a registered component (`infini_bench.memories`). The
forward pass takes and returns one memory state per layer (or one state for a memory that changes the stack,
RMT's), so a sequence of any length can be fed whole (segment-parallel, for training) or a segment at a time
(streaming); with a `cache` it continues a partial segment token by token (decoding, `infini_bench.generate`).
The block (`infini_bench.blocks`) is defined once for all three.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from infini_bench.attention import Context
from infini_bench.blocks import Block, LocalCache, RMSNorm, Rotary, Rows
from infini_bench.errors import check_choice
from infini_bench.memories import memory_class, resolve_args
from infini_bench.model_config import FLAVOURS, ModelConfig

RECOMPILE_LIMIT = 32  # traces the compiler keeps per code object (see SegmentTransformer.prepare_compile)


def is_memory_parameter(name: str) -> bool:
    """Whether a parameter (named as in state_dict) is one a memory adds to a plain decoder: a gate, a memory's own
    weights, RMT's memory tokens."""
    return name.endswith("attn.gate") or ".memory." in name or name.startswith("stack_memory.")


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, T, V), or (B, 1, V) with last_only
    states: list  # one memory state per layer (None: nothing carried yet)


class SegmentTransformer(nn.Module):
    """The decoder, whatever its memory: Infini-attention, a baseline, or none (cfg.memory). It runs in segments of
    cfg.segment_len tokens; each layer's memory, or a stack memory, carries what crosses them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg)
        # cfg.token_shift: zero at init, so the model starts as the plain decoder (no decay: one number a channel)
        self.token_shift = nn.Parameter(torch.zeros(cfg.dim)) if cfg.token_shift else None
        stack = memory_class(cfg.memory).stack
        # A memory that changes the stack (RMT's memory tokens): the segment loop asks it for each segment's rows.
        self.stack_memory = stack(cfg, resolve_args(cfg.memory, cfg.memory_args)) if stack is not None else None
        self._segment = SegmentTransformer.stack_segment  # or its compiled version (compile_blocks)
        self.apply(self._init_weights)
        self.init_memory_parameters()

    def memory_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters a memory adds to a plain decoder (named as in state_dict)."""
        return [(name, p) for name, p in self.named_parameters() if is_memory_parameter(name)]

    def init_memory_parameters(self) -> None:
        """Gates at cfg.gate_init and the memory's own parameters: the weights a pretrained checkpoint lacks."""
        with torch.no_grad():
            for block in self.layers:
                if block.attn.gate is not None:
                    block.attn.gate.fill_(float(self.cfg.gate_init))
                block.attn.memory.reset_parameters()
            if self.stack_memory is not None:
                self.stack_memory.reset_parameters()

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def prepare_compile(self) -> bool:
        """Whether the blocks may be compiled (a memory can declare that it cannot: then one warning, and they
        run eagerly), with what compiled blocks need set up outside them first.

        The blocks share one code object, so the compiler's limit of traces per code object counts every
        variant together: each kind of layer (Memorizing has two) once for training and, in a stream, once
        each for a first segment, a carried state and a partial segment (static, then dynamic). The default
        limit (8) would send Memorizing's later variants to eager silently, so it is raised to RECOMPILE_LIMIT;
        tests/test_compile.py pins how many traces each memory takes."""
        if not memory_class(self.cfg.memory).compilable:
            warnings.warn(f"memory={self.cfg.memory} cannot be compiled: trainer.compile=true runs it eagerly")
            return False
        self.fill_rotary(self.cfg.segment_len, None)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return True

    def compile_blocks(self, **options) -> None:
        """torch.compile each block in place (regional compilation: the identical blocks share one graph), or
        with a stack memory (RMT) each segment through every block as one graph; `options` go to torch.compile.
        Parameter names, and so checkpoints, are unchanged; training and streaming both use it. Idempotent.

        A stack memory's segments are sequential and each is a small amount of work for a GPU (N + 2m rows
        through every block), so compiling block by block would leave the step bound by the host: one compiled
        call, with its guards and wrappers, per block, segment and direction. One graph per segment makes that
        12x fewer calls."""
        if getattr(self, "_blocks_compiled", False) or not self.prepare_compile():
            return
        if self.stack_memory is not None:
            self._segment = torch.compile(SegmentTransformer.stack_segment, **options)
        else:
            for block in self.layers:
                block.compile(**options)
        self._blocks_compiled = True

    def fill_rotary(self, t: int, states: list | None) -> None:
        """Extend the cos/sin table, outside the compiled blocks, to every position a call over t tokens from
        `states` rotates. Growing it inside a block would change a value the compiled graph was specialised
        on (a recompile); so every call of hidden() grows it here first (a decoding call: to a segment past the
        memory's context, which covers full attention's growing cache)."""
        states = states if states is not None and self.stack_memory is None else [None] * self.cfg.n_layers
        need = max(b.attn.memory.positions(t, s) for b, s in zip(self.layers, states))
        self.rotary.table(need, self.embed.weight.device)

    def gate_layers(self) -> list[int]:
        """The layers whose memory is mixed in by a gate (all for Infini-attention, one for Memorizing)."""
        return [i for i, b in enumerate(self.layers) if b.attn.gate is not None]

    def gates(self) -> Tensor:
        """sigmoid(beta) per gated layer and head, (len(gate_layers()), H): the paper's Figure 3."""
        gates = [torch.sigmoid(self.layers[i].attn.gate.detach().float()) for i in self.gate_layers()]
        return torch.stack(gates) if gates else torch.zeros(0, self.cfg.n_heads)

    def hidden(self, input_ids: Tensor, states: list | None = None, cache: list[LocalCache] | None = None,
               pos: int | Tensor = 0) -> tuple[Tensor, list]:
        """input_ids (B, T) -> final normed hidden states (B, T, dim) and the memory states after token T.

        Without `cache`, T tokens from a segment boundary; with one LocalCache per layer, T tokens at
        positions pos .. of the current segment (decoding; the states are returned unchanged)."""
        self.fill_rotary(input_ids.shape[1] if cache is None else self.cfg.segment_len, states)
        stack = self.stack_memory
        if stack is None:
            return self._blocks(input_ids, states, cache, pos)
        if cache is None:
            return self._stack_segments(input_ids, states)
        # Decoding: the stack memory's rows fill the first cache slots at the segment's first token, the text
        # follows them; the carried state changes only when the segment is full (end_segment).
        if pos == 0 and stack.rows:
            rows = stack.memory_rows(states, input_ids.shape[0]).to(self.embed.weight.dtype)
            _, kvs = self.run_rows(rows, stack.rows_visible(input_ids.device), [None] * len(self.layers))
            for c, kv in zip(cache, kvs):
                c.k[:, :, :stack.rows] = kv.k
                c.v[:, :, :stack.rows] = kv.v
        h, _ = self._blocks(input_ids, None, cache, pos + stack.rows, text_pos=pos)
        return h, states

    def embed_tokens(self, input_ids: Tensor, cache: list[LocalCache] | None = None, pos: int | Tensor = 0) -> Tensor:
        """input_ids (B, T) -> their embeddings (B, T, dim); with cfg.token_shift, each plus the learned share of the
        previous token's within its segment. Without `cache`, T tokens from a segment boundary; with one, T tokens
        at positions pos .. of the current segment, the token before them taken from (and the last of them left in)
        the first layer's cache (`LocalCache.prev`, written in place: a CUDA graph replays the write)."""
        x = self.embed(input_ids)
        if self.token_shift is None:
            return x
        at = torch.arange(x.shape[1], device=x.device)
        if cache is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        else:
            carried = cache[0].prev
            if carried is None:
                raise ValueError("model.arch.token_shift: the decoding cache has no room for the previous token "
                                 "(make it with infini_bench.generate.new_state)")
            prev = torch.cat([carried.to(x.dtype), x[:, :-1]], dim=1)
            carried.copy_(x[:, -1:])
            at = at + pos
        first = at % self.cfg.segment_len == 0  # a segment's first token: nothing from before the boundary
        return x + self.token_shift * prev.masked_fill(first[:, None], 0.0)

    def _blocks(self, input_ids: Tensor, states: list | None, cache: list[LocalCache] | None,
                pos: int | Tensor, text_pos: int | Tensor | None = None) -> tuple[Tensor, list]:
        """The per-layer path of hidden(): every block with its own memory state. `pos` is the first cache slot
        the tokens fill; `text_pos`, their position in the segment where it differs (after a stack memory's rows)."""
        states = list(states) if states is not None else [None] * self.cfg.n_layers
        x = self.embed_tokens(input_ids, cache, pos if text_pos is None else text_pos)
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            if self.cfg.activation_checkpointing and self.training and c is None:
                x, states[i] = checkpoint(layer, x, states[i], self.rotary, use_reentrant=False)
            else:
                x, states[i] = layer(x, states[i], self.rotary, c, pos)
        return self.norm(x), states

    def _stack_segments(self, input_ids: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """The stack memory's path of hidden() from a segment boundary: one segment at a time through
        stack_segment, the state carried between them."""
        stack, n = self.stack_memory, self.cfg.segment_len
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        state = stack.start(x.shape[0]) if state is None else state
        recompute = self.training and torch.is_grad_enabled() and (self.cfg.activation_checkpointing or stack.recompute)
        outs = []
        for i, start in enumerate(range(0, x.shape[1], n)):
            text = x[:, start: start + n]
            if recompute:
                h, state = checkpoint(self._segment, self, text, state, use_reentrant=False)
            else:
                h, state = self._segment(self, text, state)
            outs.append(h)
            state = stack.carry(i, state)
        return torch.cat(outs, dim=1), state

    def stack_segment(self, text: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One segment through a stack memory: text (B, L, dim) embedded, its state -> the text's final-norm
        outputs (B, L, dim) and the next state. The stack memory wraps the text in its rows and takes the state
        out of the output; each layer's memory attends among the rows."""
        h, _ = self.run_rows(self.stack_memory.wrap(text, state))
        return self.stack_memory.unwrap(h, text.shape[1])

    def run_rows(self, x: Tensor, visible: Tensor | None = None,
                 contexts: list[Context | None] | None = None) -> tuple[Tensor, list]:
        """Rows x (B, L, dim) through every block and the final norm. Without `visible`, a wrapped segment's rows,
        attended among as each layer's memory does (-> the final-norm output and the layers' states); with it,
        each row sees the rows `visible` (L, L) allows, after the layer's context in `contexts` (a stack memory's
        rows while decoding; -> the output and each layer's keys and values, a LocalCache)."""
        out = []
        for i, layer in enumerate(self.layers):
            rows = Rows(visible, contexts[i]) if visible is not None else None
            x, kv = layer(x, None, self.rotary, rows=rows)
            out.append(kv)
        return self.norm(x), out

    def end_segment(self, states, cache: list[LocalCache]):
        """The memory state after a decoded segment that fills `cache`: every layer's memory writes it, as the
        segment-parallel path would, or a stack memory's rows run over it and give the next state."""
        stack = self.stack_memory
        if stack is None:
            # Copies: the next segment overwrites these buffers, and a memory may keep what it is given (full
            # attention's first write holds its keys as they are).
            return [block.attn.memory.write(s, c.k.clone(), c.v.clone())
                    for block, s, c in zip(self.layers, states, cache)]
        if not stack.rows:
            return states
        rows = stack.memory_rows(states, cache[0].k.shape[0])
        valid = torch.ones(cache[0].k.shape[0], cache[0].k.shape[2], dtype=torch.bool, device=rows.device)
        contexts = [Context(c.k, c.v, valid) for c in cache]  # the stack's rows + the full segment, all seen
        h, _ = self.run_rows(rows.to(self.embed.weight.dtype), stack.rows_visible(rows.device), contexts)
        return h

    def forward(self, input_ids: Tensor, states: list | None = None,
                last_only: bool = False) -> ModelOutput:
        """Segment-parallel forward over the whole of input_ids (B, T), starting from `states`."""
        h, states = self.hidden(input_ids, states)
        if last_only:
            h = h[:, -1:]
        return ModelOutput(self.lm_head(h), states)

    def segments(self, input_ids: Tensor, states: list | None = None,
                 last_only: bool = False) -> Iterator[ModelOutput]:
        """Segment-streaming forward: yields each segment's output, carrying the memory, in constant memory."""
        n = self.cfg.segment_len
        for start in range(0, input_ids.shape[1], n):
            out = self(input_ids[:, start: start + n], states, last_only=last_only)
            states = out.states
            yield out

    @torch.no_grad()
    def stream(self, input_ids: Tensor, states: list | None = None,
               last_only: bool = False) -> ModelOutput:
        """All of `segments`, concatenated (with last_only, only the very last position's logits are kept)."""
        logits = []
        for out in self.segments(input_ids, states, last_only):
            states = out.states
            logits = [out.logits] if last_only else logits + [out.logits]
        return ModelOutput(torch.cat(logits, dim=1), states)


def build_model(flavour: str | ModelConfig, **overrides) -> SegmentTransformer:
    """A randomly initialised model of a named flavour, with config fields overridden."""
    if isinstance(flavour, str):
        check_choice("model.flavour", flavour, list(FLAVOURS))
        flavour = FLAVOURS[flavour]
    return SegmentTransformer(replace(flavour, **overrides))

"""A Llama-style decoder whose attention layers carry a memory across segments (Infini-attention or a baseline).

RMSNorm, RoPE on the local attention only, SwiGLU, GQA, optional tied embeddings. Sizes are named flavours
in `FLAVOURS`; the memory is a registered component (`infini_bench.memories`). The forward pass takes and
returns one memory state per layer (or one state for a memory that changes the stack, RMT's), so a sequence
of any length can be fed whole (segment-parallel, for training) or a segment at a time (streaming); with a
`cache` it continues a partial segment token by token (decoding, `infini_bench.generate`). The block is
defined once, here, for all three.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infini_bench.attention import Context, local_attention, mix
from infini_bench.errors import ConfigError, check_choice
from infini_bench.memories import Footprint, memory_class, resolve_args


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the decoder; `segment_len`, `memory` and `memory_args` choose its memory."""

    vocab_size: int = 259
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 384
    segment_len: int = 64
    memory: str = "linear"
    memory_args: dict | None = None
    gate_init: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        resolve_args(self.memory, self.memory_args)  # a registered name and only its own parameters
        if not isinstance(self.segment_len, int) or self.segment_len <= 0:
            raise ConfigError("model.segment_len", f"{self.segment_len!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("model.n_heads", f"{self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")

    def footprint(self, seq_len: int) -> Footprint:
        """Memory carried between segments (the paper's Table 1) for sequences of seq_len tokens."""
        return memory_class(self.memory).footprint(self, resolve_args(self.memory, self.memory_args), seq_len)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads) + self.n_heads
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + emb + self.dim


RECOMPILE_LIMIT = 32  # traces the compiler keeps per code object (see SegmentTransformer.prepare_compile)

FLAVOURS: dict[str, ModelConfig] = {
    # Runs in seconds on a CPU; byte-level vocabulary.
    "tiny": ModelConfig(),
    # Paper Table 2: 12 layers, 8 heads of 128, FFN 4096, N = 2048, 32K vocabulary (tokenizer not given).
    "lm_paper": ModelConfig(vocab_size=32000, dim=1024, n_layers=12, n_heads=8, n_kv_heads=8, head_dim=128,
                            ffn_dim=4096, segment_len=2048),
    # Table 2 at one-GPU scale (experiment=table2_mini): the shape the scan in docs/REPORT_MINI.md chose,
    # byte vocabulary, N = 512 and 16 segments per 8K training sequence.
    "lm_mini": ModelConfig(vocab_size=259, dim=512, n_layers=6, n_heads=8, n_kv_heads=8, head_dim=64,
                           ffn_dim=2048, segment_len=512),
    # Llama-3.2-1B shape.
    "1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                      ffn_dim=8192, segment_len=2048, rope_theta=500000.0, tie_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-8B shape.
    "8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      ffn_dim=14336, segment_len=2048, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Small open checkpoints of the same architecture: the Table 3 and Table 4 pipelines in an hour on one GPU.
    # SmolLM2-135M and -360M shapes (Llama; tied embeddings).
    "smollm2_135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                                ffn_dim=1536, segment_len=2048, rope_theta=100000.0, tie_embeddings=True),
    "smollm2_360m": ModelConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, head_dim=64,
                                ffn_dim=2560, segment_len=2048, rope_theta=100000.0, tie_embeddings=True),
    # Qwen2.5-0.5B shape (Qwen2: a bias on q, k and v; tied embeddings).
    "qwen2_5_0_5b": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                                ffn_dim=4864, segment_len=2048, norm_eps=1e-6, rope_theta=1000000.0,
                                tie_embeddings=True, qkv_bias=True),
}


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
    """The current segment's keys and values while decoding: k (B, H_kv, N, D) un-rotated, v (B, H_kv, N, D_v)."""

    k: Tensor
    v: Tensor


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
        cache.k.index_copy_(2, at, k)
        cache.v.index_copy_(2, at, v)
    else:
        cache.k[:, :, pos: pos + length] = k
        cache.v[:, :, pos: pos + length] = v
    ctx = memory.context(state) if state is not None else None
    local = local_attention(q, cache.k, cache.v, memory.local_rotary(rotary), ctx, pos=pos)
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
        stack = memory_class(cfg.memory).stack
        # A memory that changes the stack (RMT's memory tokens): the segment loop asks it for each segment's rows.
        self.stack_memory = stack(cfg, resolve_args(cfg.memory, cfg.memory_args)) if stack is not None else None
        self._segment = SegmentTransformer.stack_segment  # or its compiled version (compile_blocks)
        self.apply(self._init_weights)
        self.init_memory_parameters()

    def memory_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters a memory adds to a plain decoder (named as in state_dict)."""
        return [(name, p) for name, p in self.named_parameters()
                if name.endswith("attn.gate") or ".memory." in name or name.startswith("stack_memory.")]

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
        h, _ = self._blocks(input_ids, None, cache, pos + stack.rows)
        return h, states

    def _blocks(self, input_ids: Tensor, states: list | None, cache: list[LocalCache] | None,
                pos: int | Tensor) -> tuple[Tensor, list]:
        """The per-layer path of hidden(): every block with its own memory state."""
        states = list(states) if states is not None else [None] * self.cfg.n_layers
        x = self.embed(input_ids)
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
        x = self.embed(input_ids)  # (B, T, dim)
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

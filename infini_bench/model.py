"""A Llama-style decoder whose every attention layer is Infini-attention.

RMSNorm, RoPE on the local attention only, SwiGLU, GQA, optional tied embeddings. Sizes are named flavours
in `FLAVOURS`. The forward pass takes and returns one `MemoryState` per layer, so a sequence of any length
can be fed whole (segment-parallel, for training) or a segment at a time (streaming, constant memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infini_bench.attention import RULES, MemoryState, infini_attention
from infini_bench.errors import ConfigError, check_choice


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
        check_choice("memory", self.memory, RULES)
        if not isinstance(self.segment_len, int) or self.segment_len <= 0:
            raise ConfigError("model.segment_len", f"{self.segment_len!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("model.n_heads", f"{self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")

    @property
    def memory_floats(self) -> int:
        """Paper Table 1: d_key (d_value + 1) H l, counted per kv head (one memory per kv head)."""
        return self.head_dim * (self.head_dim + 1) * self.n_kv_heads * self.n_layers

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads) + self.n_heads
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + emb + self.dim


FLAVOURS: dict[str, ModelConfig] = {
    # Runs in seconds on a CPU; byte-level vocabulary.
    "tiny": ModelConfig(),
    # Paper Table 2: 12 layers, 8 heads of 128, FFN 4096, N = 2048, 32K vocabulary (tokenizer not given).
    "lm_paper": ModelConfig(vocab_size=32000, dim=1024, n_layers=12, n_heads=8, n_kv_heads=8, head_dim=128,
                            ffn_dim=4096, segment_len=2048),
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
            cos, sin = self._cos_sin(offset + length, x.device)
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


class InfiniAttentionLayer(nn.Module):
    """Projections and gate around the functional Infini-attention core."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        # Eq. 10: one raw gate logit per query head, sigmoid(0) = 0.5 mixes memory and local attention.
        self.gate = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.gate_init)))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> q (B, H, T, D), k and v (B, H_kv, T, D), as strided views of the projections."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, hd).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, state: MemoryState | None, rotary: Rotary) -> tuple[Tensor, MemoryState | None]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        out, state = infini_attention(q, k, v, self.gate, segment_len=self.cfg.segment_len, rule=self.cfg.memory,
                                      state=state, rotary=rotary)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1)), state  # Eq. 11


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = InfiniAttentionLayer(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, state: MemoryState | None, rotary: Rotary) -> tuple[Tensor, MemoryState | None]:
        h, state = self.attn(self.attn_norm(x), state, rotary)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), state


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, T, V), or (B, 1, V) with last_only
    states: list[MemoryState | None]


class InfiniTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def compile_blocks(self) -> None:
        """torch.compile each block in place (regional compilation: the identical blocks share one graph).
        Parameter names, and so checkpoints, are unchanged; training and streaming both use it. Idempotent."""
        if getattr(self, "_blocks_compiled", False):
            return
        self.rotary.table(self.cfg.segment_len, self.embed.weight.device)  # built outside the compiled graphs
        for block in self.layers:
            block.compile()
        self._blocks_compiled = True

    def gates(self) -> Tensor:
        """sigmoid(beta) per layer and head, (L, H): the paper's Figure 3."""
        return torch.stack([torch.sigmoid(b.attn.gate.detach().float()) for b in self.layers])

    def hidden(self, input_ids: Tensor, states: list[MemoryState | None] | None = None
               ) -> tuple[Tensor, list[MemoryState | None]]:
        """input_ids (B, T) -> final normed hidden states (B, T, dim) and the memory after token T."""
        states = list(states) if states is not None else [None] * self.cfg.n_layers
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if self.cfg.activation_checkpointing and self.training:
                x, states[i] = checkpoint(layer, x, states[i], self.rotary, use_reentrant=False)
            else:
                x, states[i] = layer(x, states[i], self.rotary)
        return self.norm(x), states

    def forward(self, input_ids: Tensor, states: list[MemoryState | None] | None = None,
                last_only: bool = False) -> ModelOutput:
        """Segment-parallel forward over the whole of input_ids (B, T), starting from `states`."""
        h, states = self.hidden(input_ids, states)
        if last_only:
            h = h[:, -1:]
        return ModelOutput(self.lm_head(h), states)

    def segments(self, input_ids: Tensor, states: list[MemoryState | None] | None = None,
                 last_only: bool = False) -> Iterator[ModelOutput]:
        """Segment-streaming forward: yields each segment's output, carrying the memory, in constant memory."""
        n = self.cfg.segment_len
        for start in range(0, input_ids.shape[1], n):
            out = self(input_ids[:, start: start + n], states, last_only=last_only)
            states = out.states
            yield out

    @torch.no_grad()
    def stream(self, input_ids: Tensor, states: list[MemoryState | None] | None = None,
               last_only: bool = False) -> ModelOutput:
        """All of `segments`, concatenated (with last_only, only the very last position's logits are kept)."""
        logits = []
        for out in self.segments(input_ids, states, last_only):
            states = out.states
            logits = [out.logits] if last_only else logits + [out.logits]
        return ModelOutput(torch.cat(logits, dim=1), states)


def build_model(flavour: str | ModelConfig, **overrides) -> InfiniTransformer:
    """A randomly initialised model of a named flavour, with config fields overridden."""
    if isinstance(flavour, str):
        check_choice("model.flavour", flavour, list(FLAVOURS))
        flavour = FLAVOURS[flavour]
    return InfiniTransformer(replace(flavour, **overrides))

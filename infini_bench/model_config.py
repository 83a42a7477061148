"""The decoder's architecture: `ModelConfig`, and the named sizes a run picks with model=... (`FLAVOURS`)."""
from __future__ import annotations

from dataclasses import dataclass

from infini_bench.errors import ConfigError, check_bool
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
    # Add a learned per-channel share of the previous token's embedding to each token's, within a segment (a
    # segment's first token gets none, so nothing crosses a boundary). Not in the paper or any Llama checkpoint:
    # an option for synthetic probes (task=recall), where it spares a model the previous-token attention a key
    # lookup otherwise has to form first, as the short convolution before Zoology's MQAR models does.
    token_shift: bool = False

    def __post_init__(self) -> None:
        resolve_args(self.memory, self.memory_args)  # a registered name and only its own parameters
        if not isinstance(self.segment_len, int) or self.segment_len <= 0:
            raise ConfigError("model.segment_len", f"{self.segment_len!r} must be a positive integer")
        check_bool("model.arch.token_shift", self.token_shift)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("model.n_heads", f"{self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")

    def footprint(self, seq_len: int) -> Footprint:
        """Memory carried between segments (the paper's Table 1) for sequences of seq_len tokens."""
        return memory_class(self.memory).footprint(self, resolve_args(self.memory, self.memory_args), seq_len)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads) + self.n_heads
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + emb + self.dim * (2 if self.token_shift else 1)



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

"""infini-bench: Infini-attention models, training and evaluation (importable without Hydra)."""
from infini_bench.compressive import MemoryState, infini_attention
from infini_bench.model import SegmentTransformer, build_model
from infini_bench.model_config import FLAVOURS, ModelConfig

__all__ = ["FLAVOURS", "MemoryState", "ModelConfig", "SegmentTransformer", "build_model", "infini_attention"]

"""Hugging Face Llama-architecture checkpoints -> `SegmentTransformer`, with the memory's own parameters added.

The paper converts existing 1B and 8B LLMs to Infini-attention and continues pre-training (Tables 3, 4).
Only the memory's parameters are new (Infini-attention's gates: one logit beta per query head and layer,
Eq. 10; a baseline's gate or memory tokens); every other weight maps one to one. HF-format Llama q/k weights already use the half-split rotary convention of our `Rotary`, so no
permutation is needed. Reads config.json, safetensors (single file or sharded) and the tokenizer, from a
local directory or from the hub; never runs remote code. The configs' defaults are ungated copies of Meta's
base weights: unsloth/Llama-3.2-1B (model=1b) and unsloth/Meta-Llama-3.1-8B (model=8b).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from infini_bench.errors import ConfigError
from infini_bench.blocks import rope_inv_freq
from infini_bench.model import SegmentTransformer
from infini_bench.model_config import ModelConfig
from infini_bench.tokenizer import HFTokenizer

KEY = "model.pretrained"
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
# config.json, the safetensors index, tokenizer.json / tokenizer_config.json / special_tokens_map.json,
# the weights, and a sentencepiece model where a tokenizer has one. Never *.bin, *.pth, *.py.
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]

# HF parameter names (per layer, after `model.layers.{i}.`) -> ours (after `layers.{i}.`).
_LAYER_KEYS = {
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "ffn.w_gate", "mlp.up_proj": "ffn.w_up",
    "mlp.down_proj": "ffn.w_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_KEYS = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def hf_to_ours(name: str) -> str | None:
    """One HF parameter name -> ours; None for entries that carry no weight (old rotary caches)."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_KEYS:
        raise ConfigError(KEY, f"checkpoint parameter {name!r} has no counterpart in SegmentTransformer")
    return f"layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}.{m.group(3)}"


def _rope(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and rope scaling from either config layout (transformers 4.x or 5.x `rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", 10000.0)  # 5.x keeps theta among the scaling parameters
    theta = float(hf.get("rope_theta", theta))
    scaling = hf.get("rope_scaling") or params or None
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(KEY, f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return theta, None if kind == "default" else dict(scaling)


def config_from_hf(hf: dict, *, segment_len: int, memory: str, memory_args: dict | None = None,
                   gate_init: float = 0.0) -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> our ModelConfig, or a ConfigError naming what is unsupported."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(KEY, f"model_type {kind!r} is not supported (accepted: {', '.join(MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(KEY, f"hidden_act {hf['hidden_act']!r} is not supported (accepted: silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(KEY, "attention_bias / mlp_bias on o_proj and the MLP are not supported")
    window = hf.get("sliding_window") if (kind != "qwen2" or hf.get("use_sliding_window")) else None
    if window is not None and window < segment_len:
        # Attention is segment-local, so a window at least one segment long never masks anything.
        raise ConfigError(KEY, f"sliding_window={window} is shorter than model.segment_len={segment_len}")
    theta, scaling = _rope(hf)
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn_dim=hf["intermediate_size"],
        segment_len=segment_len, memory=memory, memory_args=memory_args, gate_init=gate_init, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
    )


def _short(err: Exception) -> str:
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:200]}"


def _unreachable(name: str, reason: str) -> ConfigError:
    return ConfigError(KEY, f"{name!r} could not be loaded: {reason}; set model.pretrained to a local directory "
                            "with config.json and *.safetensors, or to a hub name you can reach (gated models "
                            "such as meta-llama/Llama-3.2-1B need HF_TOKEN)")


def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory as is, or a hub name downloaded (weights, config and tokenizer files only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise _unreachable(name_or_path, "no such directory")
    from huggingface_hub import snapshot_download  # honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE

    from infini_bench.hub import prepare_hub

    prepare_hub()  # offline (cached snapshots only) at once if the hub can't be reached
    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, missing, gated, bad name: all mean "not reachable", one line
        raise _unreachable(name_or_path, _short(err)) from None


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise _unreachable(str(root), "no *.safetensors file (pytorch_model.bin is not read)")
    return files


def load_state_dict(root: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
                    ) -> dict[str, Tensor]:
    """Our state dict from a checkpoint directory: every weight the Hugging Face model has."""
    from safetensors import safe_open

    sd: dict[str, Tensor] = {}
    for file in _weight_files(root):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                ours = hf_to_ours(name)
                if ours is not None:
                    sd[ours] = f.get_tensor(name).to(device=device, dtype=dtype)  # one tensor at a time
    if cfg.tie_embeddings:  # the file holds one copy (or a duplicate): lm_head is the embedding
        sd["lm_head.weight"] = sd["embed.weight"]
    return sd


def load_pretrained(
    name_or_path: str,
    *,
    segment_len: int,
    memory: str,
    memory_args: dict | None = None,
    gate_init: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[SegmentTransformer, HFTokenizer]:
    """A Llama / Mistral / Qwen2 checkpoint as an SegmentTransformer with fresh gates, and its tokenizer."""
    root = resolve(name_or_path, revision)
    if not (root / "config.json").is_file():
        raise _unreachable(name_or_path, f"no config.json in {root}")
    cfg = config_from_hf(json.loads((root / "config.json").read_text()), segment_len=segment_len, memory=memory,
                         memory_args=memory_args, gate_init=gate_init)
    sd = load_state_dict(root, cfg, dtype, device)
    with torch.device("meta"):  # no random init of billions of weights that are overwritten at once
        model = SegmentTransformer(cfg)
    # The memory's own parameters (gates, memory tokens, ...) are the only ones no checkpoint has.
    own = {name for name, _ in model.memory_parameters()}
    missing = sorted(set(model.state_dict()) - set(sd) - own)
    if missing:
        raise ConfigError(KEY, f"{name_or_path!r} lacks {len(missing)} weights, e.g. {missing[0]!r}")
    model.load_state_dict(sd, strict=False, assign=True)
    for name in own:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(torch.empty_like(getattr(module, attr), dtype=dtype, device=device)))
    model.init_memory_parameters()
    if cfg.tie_embeddings:  # assign=True gives each module its own Parameter: tie them again
        model.lm_head.weight = model.embed.weight
    model.rotary.inv_freq = rope_inv_freq(cfg).to(device)  # a non-persistent buffer, still on meta
    try:
        tokenizer = HFTokenizer(str(root))
    except Exception as err:  # missing or unreadable tokenizer files
        raise _unreachable(name_or_path, f"tokenizer: {_short(err)}") from None
    return model, tokenizer

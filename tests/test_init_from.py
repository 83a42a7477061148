"""model.init_from across memories: a decoder trained with one memory (or none) starts a run of another, the
parameters only the new memory has keeping their initial values, as a converted Hugging Face model does."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from infini_bench.errors import ConfigError
from infini_bench.model import build_model
from tasks.common import load_weights


def _export(model, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("source, target", [("none", "linear"), ("none", "memorizing"), ("none", "rmt"),
                                            ("linear", "delta"), ("linear", "none")])
def test_another_memory_starts_from_the_decoder_weights(tmp_path, source, target):
    torch.manual_seed(0)
    src = build_model("tiny", memory=source, segment_len=16)
    with torch.no_grad():  # gates away from their initial value, so that a gate carried over shows
        for name, p in src.memory_parameters():
            p.add_(1.0)
    _export(src, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    dst = build_model("tiny", memory=target, segment_len=16, gate_init=-2.0)
    fresh = {name: p.detach().clone() for name, p in dst.memory_parameters()}
    load_weights(dst, str(tmp_path / "model.safetensors"))
    theirs, own = src.state_dict(), dict(dst.memory_parameters())
    for name, value in dst.state_dict().items():
        if name in own and name not in theirs:
            assert torch.equal(value, fresh[name]), name  # the new memory's own: as initialised
        else:
            assert torch.equal(value, theirs[name]), name
    shared = [n for n in own if n in theirs]
    assert bool(shared) == (source != "none" and target != "none")  # linear -> delta: the gates carry over


def test_a_file_that_lacks_a_decoder_weight_or_does_not_fit_is_one_line(tmp_path):
    src = build_model("tiny", memory="none", segment_len=16)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    dropped = "layers.1.ffn.w_up.weight"
    save_file({k: v for k, v in sd.items() if k != dropped}, str(tmp_path / "lacks.safetensors"))
    with pytest.raises(ConfigError, match=f"lacks 1 weights, e.g. '{dropped}'"):
        load_weights(build_model("tiny", memory="linear", segment_len=16), str(tmp_path / "lacks.safetensors"))
    save_file({**sd, "extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConfigError, match="has unexpected 1 weights, e.g. 'extra.weight'"):
        load_weights(build_model("tiny", memory="none", segment_len=16), str(tmp_path / "extra.safetensors"))
    wider = build_model("tiny", memory="none", segment_len=16, dim=64, n_heads=2, n_kv_heads=2, head_dim=32)
    _export(wider, tmp_path / "wider.safetensors")
    before = {k: v.clone() for k, v in src.state_dict().items()}
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_weights(src, str(tmp_path / "wider.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in src.state_dict().items())  # nothing half-loaded


def test_tied_embeddings_load_from_a_file_that_stores_them_once(tmp_path):
    """export_weights stores a tied output matrix once (as embed.weight): loading restores both names, still tied."""
    from types import SimpleNamespace

    from tasks.common import export_weights

    torch.manual_seed(0)
    src = build_model("tiny", memory="none", segment_len=16, tie_embeddings=True)
    path = export_weights(src, SimpleNamespace(out_dir=tmp_path, is_main=True))
    dst = build_model("tiny", memory="linear", segment_len=16, tie_embeddings=True)
    load_weights(dst, str(path))
    assert dst.lm_head.weight is dst.embed.weight and torch.equal(dst.embed.weight, src.embed.weight)

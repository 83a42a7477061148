"""The benchmarks in CPU mode (tiny sizes): every section runs, its JSON and markdown are complete.

This keeps `bench/` from rotting between GPU runs; the numbers themselves mean nothing on a CPU.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from a checkout (python -m bench.bench), not installed

from bench import bench, flops, prefill, report  # noqa: E402
from bench.common import Sizes  # noqa: E402
from infini_bench.model import FLAVOURS, build_model  # noqa: E402


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CPU run of every section (the slow part, shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "bench.json", tmp / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nA closing note written by hand.\n")
    data = bench.main(["--cpu", "all", "--out", str(out), "--write-md", str(md)])
    return data, out, md


def test_json_has_every_section_with_its_provenance(run):
    data, out, _ = run
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    for name in ("train", "prefill", "decode"):
        sec = data[name]
        assert {"meta", "ceilings", "config", "rows", "targets"} <= sec.keys()
        assert sec["meta"]["command"].startswith("python -m bench.bench --cpu all")
        assert sec["meta"]["date"] and sec["meta"]["device"] and "torch" in sec["meta"]["versions"]
        assert positive(sec["ceilings"]["matmul_tflops"]) and positive(sec["ceilings"]["copy_tb_s"])
        assert not [r for r in sec["rows"] if "error" in r], sec["rows"]
        for t in sec["targets"]:
            assert math.isfinite(t["measured"]) and isinstance(t["met"], bool)


def test_train_rows_are_positive_and_finite(run):
    rows = {r["name"]: r for r in run[0]["train"]["rows"]}
    assert {"none", "linear", "delta", "full", "lucidrains"} <= rows.keys()
    for name in ("none", "linear", "delta", "full"):
        r = rows[name]
        for key in ("step_ms", "fwd_bwd_ms", "tokens_per_s", "tflop_per_step", "floor_ms", "mfu"):
            assert positive(r[key]), (name, key, r[key])
        assert r["fwd_bwd_ms"] <= r["step_ms"] and math.isfinite(r["loss"])
    assert "skipped" in rows["lucidrains"] or positive(rows["lucidrains"]["tokens_per_s"])
    ratios = [t["target"] for t in run[0]["train"]["targets"]]
    assert any("linear" in t and "none" in t for t in ratios) and any(t.startswith("MFU") for t in ratios)


def test_prefill_streams_every_length_and_extrapolates_full_attention(run):
    sizes = Sizes.tiny()
    rows = run[0]["prefill"]["rows"]
    for rule in sizes.prefill_rules:
        got = {r["length"]: r for r in rows if r["name"] == rule}
        assert set(got) == set(sizes.prefill_lengths)
        assert all(positive(r["seconds"]) and positive(r["floor_s"]) for r in got.values())
    measured = {r["length"] for r in rows if r["name"] == "full"}
    assert measured == set(sizes.full_lengths)
    extrapolated = [r for r in rows if r["name"] == "full (extrapolated)"]
    assert [r["length"] for r in extrapolated] == [max(sizes.prefill_lengths)]
    assert positive(extrapolated[0]["seconds"])


def test_decode_latency_at_every_context(run):
    rows = run[0]["decode"]["rows"]
    contexts = list(Sizes.tiny().decode_contexts)
    assert [(r["context"], r["step"]) for r in rows] == [(c, s) for c in contexts for s in ("eager", "static")]
    for r in rows:
        assert all(positive(r[k]) for k in ("median_ms", "mean_ms", "p90_ms", "max_ms", "floor_ms", "prefill_s"))
    targets = [t["target"] for t in run[0]["decode"]["targets"]]
    assert targets == ["eager: latency at 1K <= 2 x at 128", "static: latency at 1K <= 2 x at 128"]


def test_markdown_sections_replace_in_place_and_keep_hand_written_text(run):
    data, out, md = run
    text = md.read_text()
    assert "A closing note written by hand." in text
    for name, title in report.TITLES.items():
        assert text.count(f"<!-- bench:{name}:begin -->") == 1 and text.count(f"<!-- bench:{name}:end -->") == 1
        assert f"## {title} (tiny, CPU mode)" in text
    assert "- command: `python -m bench.bench --cpu all" in text and "| none |" in text
    bench.main(["--out", str(out), "--write-md", str(md)])  # render only: nothing measured, same file
    assert md.read_text() == text


def test_flop_counts_follow_the_stated_formulas():
    cfg = FLAVOURS["lm_paper"]
    t, n = 32768, 2048
    local = flops.attention_flops(cfg, t, n)
    assert local == cfg.n_layers * cfg.n_heads * t * n * 2 * cfg.head_dim  # 2 T N d per head and layer
    assert flops.attention_flops(cfg, t, t) == local * (t // n)  # full causal attention: T / N times more
    assert flops.memory_flops(cfg, "none", t, n) == 0
    assert 0 < flops.memory_flops(cfg, "linear", t, n) < flops.memory_flops(cfg, "delta", t, n)
    with torch.device("meta"):
        model = build_model("lm_paper")
    p = flops.linear_params(model)
    norms_and_gates = (2 * cfg.n_layers + 1) * cfg.dim + cfg.n_layers * cfg.n_heads
    assert p == cfg.num_params() - cfg.vocab_size * cfg.dim - norms_and_gates  # all but embedding, norms, gates
    assert flops.train_flops(cfg, p, "none", t, n) == 6 * p * t + 3 * local


def test_full_attention_extrapolation_is_exact_on_a_quadratic():
    cost = lambda t: 2e-6 * t + 3e-12 * t * t  # noqa: E731
    rows = [{"name": "full", "length": t, "seconds": cost(t)} for t in (32768, 131072)]
    (row,) = prefill.extrapolate_full(rows, (32768, 131072, 1048576))
    assert row["length"] == 1048576 and row["seconds"] == pytest.approx(cost(1048576), rel=1e-9)
    assert row["extrapolated"] == "a T + b T^2 through 32K and 128K"

"""The benchmarks in CPU mode (tiny sizes): every section runs, its JSON and markdown are complete.

This keeps `bench/` from rotting between GPU runs; the numbers themselves mean nothing on a CPU.
"""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run from a checkout (python -m bench.bench), not installed

from bench import bench, flops, prefill, report  # noqa: E402
from bench.common import PEER, Sizes, registered_memories, streaming_memories  # noqa: E402
from bench.prefill import bench_prefill  # noqa: E402
from bench.train import bench_train  # noqa: E402
from infini_bench.memories import memorizing, memory_names, txl  # noqa: E402
from infini_bench.model import build_model  # noqa: E402
from infini_bench.model_config import FLAVOURS  # noqa: E402


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


AFTER_RUN: dict = {}  # process state the bench run left behind


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CPU run of every section (the slow part, shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "bench.json", tmp / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nA closing note written by hand.\n")
    torch.backends.cuda.enable_cudnn_sdp(True)
    data = bench.main(["--cpu", "all", "--out", str(out), "--write-md", str(md)])
    AFTER_RUN["cudnn_sdp"] = torch.backends.cuda.cudnn_sdp_enabled()  # the bench leaves cuDNN out, as runs do
    torch.backends.cuda.enable_cudnn_sdp(True)
    return data, out, md


def test_the_bench_leaves_cudnn_attention_out_as_runs_do(run):
    assert AFTER_RUN["cudnn_sdp"] is False


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


def test_every_registered_memory_has_its_rows():
    assert set(registered_memories()) == set(memory_names())
    assert registered_memories()[:7] == ("none", "linear", "delta", "full", "txl", "memorizing", "rmt")
    sizes = Sizes()
    assert sizes.train_memories == (*registered_memories(), PEER)
    assert set(sizes.prefill_memories) == set(memory_names()) - {"none", "full"}


def test_train_rows_are_positive_and_finite(run):
    rows = {r["name"]: r for r in run[0]["train"]["rows"]}
    assert rows.keys() == {*memory_names(), PEER}
    for name in memory_names():
        r = rows[name]
        assert r["memory"] == name
        for key in ("step_ms", "fwd_bwd_ms", "tokens_per_s", "tflop_per_step", "floor_ms", "mfu"):
            assert positive(r[key]), (name, key, r[key])
        assert r["fwd_bwd_ms"] <= r["step_ms"] and math.isfinite(r["loss"])
    assert "skipped" in rows["lucidrains"] or positive(rows["lucidrains"]["tokens_per_s"])
    ratios = [t["target"].split(" tokens/s")[0] for t in run[0]["train"]["targets"]]
    assert ratios[:5] == ["linear", "delta", "txl", "memorizing", "rmt"]  # eager rows: the run has no compiled ones
    assert any(t.startswith("MFU") for t in ratios)


def test_prefill_streams_every_length_and_extrapolates_full_attention(run):
    sizes = Sizes.tiny()
    rows = run[0]["prefill"]["rows"]
    assert sizes.prefill_memories == streaming_memories()
    for memory in sizes.prefill_memories:
        got = {r["length"]: r for r in rows if r["name"] == memory}
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
    local = flops.attention_flops(cfg, t)
    causal = n * (n + 1) // 2
    assert local == cfg.n_layers * cfg.n_heads * (t // n) * causal * 4 * cfg.head_dim  # QK^T, PV: 2 d each
    full = flops.attention_flops(replace(cfg, memory="full"), t)
    assert full == flops.attention_flops(replace(cfg, memory="none", segment_len=t), t)
    assert full / local == pytest.approx(t / n, rel=1e-3)  # full causal attention: T / N times more
    with torch.device("meta"):
        model = build_model("lm_paper")
    p = flops.linear_params(model)
    norms_and_gates = (2 * cfg.n_layers + 1) * cfg.dim + cfg.n_layers * cfg.n_heads
    assert p == cfg.num_params() - cfg.vocab_size * cfg.dim - norms_and_gates  # all but embedding, norms, gates
    train = {m: flops.train_flops(replace(cfg, memory=m), p, t) for m in memory_names()}
    assert train["none"] == 6 * p * t + 3 * local
    assert train["none"] < train["linear"] < train["delta"]
    assert train["none"] < train["txl"] < train["memorizing"] and train["none"] < train["rmt"] < train["full"]


class Counter:
    """Counts, during a forward pass, what the attention masks allow: every SDPA call's (query, key) pairs per
    head, the rows through the first block and its W_k, and each kNN search's valid slots and k."""

    def __init__(self, monkeypatch, model):
        self.pairs = self.rows = self.k_rows = self.slots = self.topk = 0
        sdpa, knn = F.scaled_dot_product_attention, memorizing.knn_attention

        def count_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
            x, h, length, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            if isinstance(attn_mask, CausalBias):  # its dispatch looks for the unpatched SDPA: pass it as a tensor
                attn_mask = mask = attn_mask._materialize(q.device)
            elif attn_mask is not None:
                mask = attn_mask
            else:
                mask = torch.ones(length, s, dtype=torch.bool)
                if is_causal:
                    mask = mask.tril()  # SDPA's is_causal: top-left aligned
            self.pairs += int(mask.expand(x, h, length, s).sum())
            return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

        def count_knn(q, keys, values, key_valid, top_k, lo, hi):
            valid = hi - lo if key_valid is None else int(key_valid[0, lo:hi].sum())
            self.slots += q.shape[1] * q.shape[2] * valid  # B = 1
            self.topk += q.shape[1] * q.shape[2] * min(top_k, valid)
            return knn(q, keys, values, key_valid, top_k, lo, hi)

        def count_rows(_module, inputs):
            self.rows += inputs[0].shape[1]

        def count_k_rows(_module, inputs):
            self.k_rows += inputs[0].shape[1]

        monkeypatch.setattr(F, "scaled_dot_product_attention", count_sdpa)
        monkeypatch.setattr(memorizing, "knn_attention", count_knn)
        model.layers[0].register_forward_pre_hook(count_rows)
        model.layers[0].attn.wk.register_forward_pre_hook(count_k_rows)


CASES = [("none", None), ("linear", None), ("delta", None), ("full", None), ("txl", None),
         ("txl", {"mem_len": 5}), ("txl", {"mem_len": 13, "cache": "kv"}),
         ("memorizing", {"knn_size": 12, "top_k": 4}), ("memorizing", {"knn_size": 40, "top_k": 3, "mem_len": 0}),
         ("rmt", {"num_mem_tokens": 3}), ("rmt", {"num_mem_tokens": 2, "causal": True})]


@pytest.mark.parametrize("training", [True, False], ids=["train", "stream"])
@pytest.mark.parametrize("memory,args", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_flop_formulas_count_what_the_masks_allow(monkeypatch, memory, args, training):
    """The formulas against the model itself: pairs its masks allow, rows it runs, kNN slots it searches."""
    t, n = 32, 8
    cfg = replace(FLAVOURS["tiny"], segment_len=n, n_layers=2, memory=memory, memory_args=args)
    assert set(m for m, _ in CASES) == set(memory_names())  # a new memory needs a case here
    torch.manual_seed(0)
    model = build_model(cfg)
    count = Counter(monkeypatch, model)
    ids = torch.randint(0, cfg.vocab_size, (1, t))
    if training:
        model.train()
        model(ids)
    else:
        with torch.inference_mode():
            for _ in model.eval().segments(ids, last_only=True):
                pass
    p_lin = flops.linear_params(model)
    parts = flops.forward_flops(cfg, p_lin, t, training)
    assert count.pairs == cfg.n_layers * cfg.n_heads * flops.attention_pairs(cfg, t)
    p_head = cfg.vocab_size * cfg.dim
    head_rows = t if training else t // n
    assert parts["linear"] == 2 * (p_lin - p_head) * count.rows + 2 * p_head * head_rows
    kv_weights = model.layers[0].attn.wk.weight.numel() + model.layers[0].attn.wv.weight.numel()
    assert count.k_rows == count.rows + parts["recompute"] / (cfg.n_layers * 2 * kv_weights)
    d = cfg.head_dim
    assert parts["selection"] == 2 * d * count.slots
    if memory == "memorizing":
        assert parts["memory"] == (4 * d + 4) * count.topk and count.slots > 0
        assert count.slots < cfg.n_heads * sum(range(0, t, n)) * n or args["knn_size"] >= t  # the cap bites
    total = sum(parts.values())
    assert flops.prefill_flops(cfg, p_lin, t) == (total if not training else pytest.approx(
        total - parts["recompute"] - 2 * p_head * (t - t // n)))
    if training:
        assert flops.train_flops(cfg, p_lin, t) == 3 * total - 2 * parts["selection"] - parts["recompute"]


def test_a_failing_memory_becomes_error_rows_and_the_others_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(txl.TransformerXL, "forward", broken)
    sizes = replace(Sizes.tiny(), train_memories=("none", "txl"), train_seq=128, train_iters=1,
                    prefill_memories=("txl", "linear"), prefill_lengths=(128, 256), full_lengths=(128,))
    ceilings = {"matmul_tflops": 1.0, "copy_tb_s": 1.0}
    rows = {r["name"]: r for r in bench_train(torch.device("cpu"), sizes, ceilings, False)["rows"]}
    assert rows["txl"]["error"] == "RuntimeError: broken on purpose" and positive(rows["none"]["tokens_per_s"])
    rows = bench_prefill(torch.device("cpu"), sizes, ceilings, False)["rows"]
    assert [(r["name"], r["length"], r.get("error")) for r in rows if "error" in r] == [
        ("txl", 128, "RuntimeError: broken on purpose"), ("txl", 256, "RuntimeError: broken on purpose")]
    assert [(r["name"], r["length"]) for r in rows if "seconds" in r] == [("linear", 128), ("linear", 256),
                                                                          ("full", 128)]


def test_train_rules_is_a_deprecated_alias(capsys):
    args = bench.parse_args(["train", "--train-rules", "none,txl", "--prefill-memories", "rmt"])
    assert "--train-rules is deprecated" in capsys.readouterr().err
    sizes = bench.sizes_from(args)
    assert sizes.train_memories == ("none", "txl") and sizes.prefill_memories == ("rmt",)
    assert bench.sizes_from(bench.parse_args(["train", "--train-memories", "none,txl"])).train_memories == (
        "none", "txl")
    for bad in (["--train-memories", "none,nope"], ["--prefill-memories", "none"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["train", *bad])
        assert e.value.code == 2
    assert "is not one of" in capsys.readouterr().err


def test_full_attention_extrapolation_is_exact_on_a_quadratic():
    cost = lambda t: 2e-6 * t + 3e-12 * t * t  # noqa: E731
    rows = [{"name": "full", "length": t, "seconds": cost(t)} for t in (32768, 131072)]
    (row,) = prefill.extrapolate_full(rows, (32768, 131072, 1048576))
    assert row["length"] == 1048576 and row["seconds"] == pytest.approx(cost(1048576), rel=1e-9)
    assert row["extrapolated"] == "a T + b T^2 through 32K and 128K"


def test_compile_mode_reaches_the_compiled_training_rows(monkeypatch):
    """--compile-mode is passed to compile_blocks (torch.compile's mode) for the +compile rows only, and noted."""
    from infini_bench.model import SegmentTransformer

    calls = []
    monkeypatch.setattr(SegmentTransformer, "compile_blocks", lambda self, **options: calls.append(options))
    args = bench.parse_args(["train", "--cpu", "--compile", "--compile-mode", "max-autotune-no-cudagraphs",
                             "--train-memories", "none", "--iters", "1"])
    sizes = bench.sizes_from(args)
    assert sizes.compile_mode == "max-autotune-no-cudagraphs"
    sec = bench_train(torch.device("cpu"), sizes, {"matmul_tflops": 1.0, "copy_tb_s": 1.0}, compile_blocks=True)
    assert [r["name"] for r in sec["rows"]] == ["none", "none+compile"]
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}]  # once, for the compiled row
    assert sec["rows"][0]["note"] == "" and sec["rows"][1]["note"].endswith(", mode=max-autotune-no-cudagraphs")
    with pytest.raises(SystemExit):
        bench.parse_args(["train", "--compile-mode", "fastest"])

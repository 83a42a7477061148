"""Streaming decoding == the segment-parallel forward; stopping; nucleus filtering; reproducible sampling."""
import pytest
import torch

from infini_bench.generate import StaticDecoder, decode_step, feed, generate, new_state, prefill, top_p_filter
from infini_bench.model import build_model

N = 16  # segment length: every test below crosses several segment boundaries


def tiny(rule="linear"):
    torch.manual_seed(0)
    model = build_model("tiny", memory=rule, segment_len=N).eval()
    with torch.no_grad():  # open the gates away from 0.5 so the memory path matters
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
    return model


def tokens(t, b=2, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
@pytest.mark.parametrize("prompt_len", [37, 32, 5])  # ends mid-segment, on a boundary, inside the first segment
def test_teacher_forced_decode_equals_parallel(rule, prompt_len):
    model, ids = tiny(rule), tokens(85)
    with torch.no_grad():
        parallel = model(ids).logits  # (B, T, V)
    last, state = prefill(model, ids[:, :prompt_len])
    steps = [last]
    for t in range(prompt_len, ids.shape[1]):
        steps.append(decode_step(model, ids[:, t], state))
    decoded = torch.stack(steps, dim=1)  # logits for positions prompt_len - 1 .. T - 1
    torch.testing.assert_close(decoded, parallel[:, prompt_len - 1:], rtol=1e-4, atol=1e-4)
    assert state.length == ids.shape[1] and state.pos == ids.shape[1] % N


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
def test_eager_decode_step_attends_without_a_mask(rule, monkeypatch):
    """An eager step's one query sees every cached key of its segment, so its attention takes no mask (SDPA's
    flash kernel takes none), and still equals the parallel forward."""
    import infini_bench.attention as attention

    model, ids = tiny(rule), tokens(40)
    with torch.no_grad():
        parallel = model(ids).logits
    last, state = prefill(model, ids[:, :21])
    masks = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    steps = [decode_step(model, ids[:, t], state) for t in range(21, 40)]  # crosses the boundary at 32
    assert len(masks) == 19 * len(model.layers) and all(m is None for m in masks)
    torch.testing.assert_close(torch.stack(steps, 1), parallel[:, 21:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
@pytest.mark.parametrize("prompt_len", [37, 32, 5])
def test_static_decoder_equals_parallel(rule, prompt_len):
    """The fixed-shape step a CUDA graph captures (here run eagerly): whole-cache attention under a mask, the
    position on the device, memory in fixed buffers behind a flag, across several memory writes."""
    model, ids = tiny(rule), tokens(85)
    with torch.no_grad():
        parallel = model(ids).logits
    last, state = prefill(model, ids[:, :prompt_len])
    decoder = StaticDecoder(model, state, graph=False)
    steps = [last] + [decoder.step(ids[:, t]) for t in range(prompt_len, ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel[:, prompt_len - 1:], rtol=1e-4, atol=1e-4)
    assert state.length == ids.shape[1] and state.pos == ids.shape[1] % N
    for fixed, real in zip(decoder.fixed, state.states):  # the step read the memory written so far
        assert (fixed is None) == (rule == "none") and (real is None or all(map(torch.equal, fixed, real)))


@pytest.mark.parametrize("rule", ["linear", "delta", "none", "txl", "memorizing"])
def test_static_decoder_under_bf16_autocast_equals_eager_decoding(rule):
    """Under bf16 autocast (how the tasks evaluate on a GPU), the fixed-shape step writes bf16 keys and values
    into the fp32 cache the prompt left: it must cast them as eager decoding does, not fail on the dtype."""
    from infini_bench.train import autocast

    model, ids = tiny(rule), tokens(60)
    with autocast(ids.device, "bf16"):
        _, eager_state = prefill(model, ids[:, :37])
        eager = [decode_step(model, ids[:, t], eager_state) for t in range(37, 60)]
        _, state = prefill(model, ids[:, :37])
        decoder = StaticDecoder(model, state, graph=False)
        static = [decoder.step(ids[:, t]) for t in range(37, 60)]
    torch.testing.assert_close(torch.stack(static, 1).float(), torch.stack(eager, 1).float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_feed_in_uneven_chunks_equals_parallel(rule):
    """Chunks that start and end mid-segment (multi-token cached attention with a causal mask)."""
    model, ids = tiny(rule), tokens(90)
    with torch.no_grad():
        parallel = model(ids).logits
    state = new_state(model, 2)
    chunks = [feed(model, ids[:, a:b], state, last_only=False) for a, b in [(0, 7), (7, 40), (40, 41), (41, 90)]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), parallel, rtol=1e-4, atol=1e-4)


def test_memory_matters_in_decoding():
    """The check above is not vacuous: a token several segments back changes the decoded logits."""
    model, ids = tiny("linear"), tokens(70, b=1)
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256
    a, _ = prefill(model, ids)
    b, _ = prefill(model, changed)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_generate_then_score_equals_parallel(rule):
    model, prompt = tiny(rule), tokens(21, b=1)
    gen = generate(model, prompt, max_new_tokens=40, temperature=1.0, top_p=0.9, seed=3, return_logits=True)
    new = torch.tensor(gen.tokens)
    assert new.shape == (1, 40) and not gen.hit_eos[0]
    with torch.no_grad():
        scored = model(torch.cat([prompt, new], dim=1)).logits
    torch.testing.assert_close(gen.logits, scored[:, 20:-1], rtol=1e-4, atol=1e-4)


def test_stops_at_eos_or_limit():
    model, prompt = tiny(), tokens(10, b=1)
    free = generate(model, prompt, max_new_tokens=12, greedy=True)
    assert len(free.tokens[0]) == 12 and free.hit_eos == [False]
    seq = free.tokens[0]
    i = next(j for j in range(1, 12) if seq[j] not in seq[:j])  # first token that has not appeared before
    stopped = generate(model, prompt, max_new_tokens=12, greedy=True, eos_id=seq[i])
    assert stopped.tokens[0] == seq[:i] and stopped.hit_eos == [True]


def test_rows_stop_independently():
    model, prompt = tiny(), tokens(10, b=2)
    free = generate(model, prompt, max_new_tokens=8, greedy=True)
    eos = free.tokens[0][2]
    out = generate(model, prompt, max_new_tokens=8, greedy=True, eos_id=eos)
    for row, full in zip(out.tokens, free.tokens):
        cut = full.index(eos) if eos in full else len(full)
        assert row == full[:cut]


def test_sampling_is_reproducible_by_seed():
    model, prompt = tiny(), tokens(10, b=1)
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.95)
    a, b, c = (generate(model, prompt, seed=s, **kw).tokens for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).squeeze(0).tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert kept(0.9) == [False, True, True, True]  # 0.5 + 0.3 + 0.15 >= 0.9
    assert kept(0.4) == [False, True, False, False]
    assert kept(1.0) == [True] * 4


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(2000, 1)
    probs = top_p_filter(logits, 0.7).softmax(-1)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the nucleus


def memorizing(knn_layer, mem_len, n_layers=4):
    torch.manual_seed(0)
    args = {"knn_size": 1000, "top_k": 4, "knn_layer": knn_layer, "mem_len": mem_len}
    model = build_model("tiny", memory="memorizing", memory_args=args, segment_len=N, n_layers=n_layers).eval()
    with torch.no_grad():  # the gate open, the scores sharp: what the search returns shows in the logits
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.fill_(2.0)
                layer.attn.memory.scale.fill_(8.0)
    return model


@pytest.mark.parametrize("knn_layer,mem_len,reach", [(3, None, 2), (1, None, 4), (2, 2 * N, 5), (4, None, 1)])
def test_prefill_skips_only_the_searches_that_cannot_matter(knn_layer, mem_len, reach, monkeypatch):
    """Memorizing's kNN search feeds only the layers above it, each of which carries its input on for
    ceil(mem_len / N) segments: prefill searches the prompt's last `reach` segments only, and what it returns, and
    every token decoded after it, is what searching every segment gives. Searching one segment fewer changes it."""
    from infini_bench.memories import memorizing as module

    model, ids = memorizing(knn_layer, mem_len), tokens(9 * N + 5)
    prompt = 7 * N + 3  # 7 whole segments and 3 tokens; decoding then crosses two segment ends
    assert [b.attn.memory.search_reach() for b in model.layers] == [reach if i == knn_layer - 1 else None
                                                                    for i in range(4)]
    searches = []

    def run(reach_override=None):
        with monkeypatch.context() as patch:
            if reach_override is not None:
                patch.setattr(module.MemorizingTransformer, "search_reach",
                              lambda self: reach_override if self.knn else None)
            real = module.knn_attention
            patch.setattr(module, "knn_attention", lambda *a, **k: searches.append(1) or real(*a, **k))
            last, state = prefill(model, ids[:, :prompt])
            steps = [decode_step(model, ids[:, t], state) for t in range(prompt, ids.shape[1])]
        return torch.cat([last[:, None], torch.stack(steps, 1)], dim=1)

    skipping = run()
    assert len(searches) == reach + (ids.shape[1] - prompt)  # the last `reach` segments, then one per token
    everything = run(10**6)  # a reach past the prompt's start: every segment searched
    assert len(searches) == reach + 8 + 2 * (ids.shape[1] - prompt)  # and then 8 segments, and every token
    torch.testing.assert_close(skipping, everything, rtol=1e-5, atol=1e-5)
    if reach > 1:
        assert (run(reach - 1) - everything).abs().max() > 1e-3

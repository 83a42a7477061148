"""Memorizing Transformers' kNN memory against second computations, in fp32: dense attention, a sort-based
top-k in float64, Transformer-XL with the gate closed, the segment-by-segment definition, finite differences."""
import pytest
import torch
import torch.nn.functional as F

from infini_bench.errors import ConfigError
from infini_bench.memories import Memory, memorizing, memory_class
from infini_bench.memories.memorizing import KNNState, TopKAttention, no_rotary
from infini_bench.model import build_model
from infini_bench.model_config import FLAVOURS

N, B, H, HK, D = 8, 2, 4, 2, 32


def model(seed: int = 0, memory: str = "memorizing", **args):
    torch.manual_seed(seed)
    args = {"knn_size": 20, "top_k": 4, "knn_layer": 2, **args} if memory == "memorizing" else args
    m = build_model("tiny", memory=memory, memory_args=args or None, segment_len=N, n_layers=2).eval()
    with torch.no_grad():
        for layer in m.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
            if getattr(layer.attn.memory, "scale", None) is not None:
                layer.attn.memory.scale.uniform_(2, 6)  # peaked enough that the choice of keys matters
    return m


def knn(**args):
    """The kNN layer's memory of a tiny model, and the model (for its rotary)."""
    m = model(**args)
    return m.layers[1].attn.memory, m


def rand(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def written(mem, segments: int, seed: int = 3):
    """A state after `segments` segments of random keys and values, and those keys and values (B, H_kv, sN, D)."""
    k, v = rand(B, HK, segments * N, D, seed=seed), rand(B, HK, segments * N, D, seed=seed + 1)
    state = None
    for s in range(segments):
        state = mem.write(state, k[:, :, s * N:(s + 1) * N], v[:, :, s * N:(s + 1) * N])
    return state, k, v


def reference_read(mem, q, keys, values, k=None):
    """float64: cosine scores scaled per head over the given keys (B, H_kv, S, D), sorted, the best k kept."""
    g = q.shape[1] // keys.shape[1]
    keys = F.normalize(keys.double(), dim=-1).repeat_interleave(g, 1)
    scores = F.normalize(q.double(), dim=-1) @ keys.transpose(-1, -2)
    scores = scores * mem.scale.detach().double().abs().view(1, -1, 1, 1)  # (B, H, L, S)
    order = scores.argsort(dim=-1, descending=True)[..., : k or scores.shape[-1]]
    w = scores.gather(-1, order).softmax(-1)  # (B, H, L, k)
    vals = values.double().repeat_interleave(g, 1)  # (B, H, S, D)
    picked = vals[torch.arange(B)[:, None, None, None], torch.arange(q.shape[1])[None, :, None, None], order]
    return torch.einsum("bhlk,bhlkd->bhld", w, picked)


@pytest.mark.parametrize("top_k", [24, 40])
def test_k_at_least_the_filled_count_is_dense_attention_over_the_memory(top_k):
    mem, _ = knn(knn_size=32, top_k=top_k)
    state, k, v = written(mem, 3)  # 24 of 32 slots filled
    q = rand(B, H, 5, D, seed=7)
    out, has = mem.read(q, state)
    assert has.all()
    torch.testing.assert_close(out.double(), reference_read(mem, q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, memorizing.CHUNK])
def test_top_k_equals_a_sort_based_reference_over_the_last_knn_size_tokens(chunk, monkeypatch):
    monkeypatch.setattr(memorizing, "CHUNK", chunk)  # 5: query rows scored a few at a time
    mem, _ = knn(knn_size=20, top_k=3)
    state, k, v = written(mem, 4)  # 32 tokens into 20 slots: the ring wrapped, the first 12 are gone
    q = rand(B, H, 6, D, seed=8)
    out, _ = mem.read(q, state)
    torch.testing.assert_close(out.double(), reference_read(mem, q, k[:, :, -20:], v[:, :, -20:], 3),
                               rtol=1e-5, atol=1e-5)
    assert state.knn_valid.all() and (state.ptr == 32 % 20).all()


def test_empty_store_reads_nothing():
    mem, _ = knn()
    out, has = mem.read(rand(B, H, 1, D, seed=1), mem.empty_state(B, torch.device("cpu"), torch.float32))
    assert not has.any() and (out == 0).all()


@pytest.mark.parametrize("knn_rope", [True, False])
def test_gate_closed_equals_transformer_xl_with_the_same_weights(knn_rope):
    mem_model = model(knn_rope=knn_rope)
    txl = model(memory="txl")
    unexpected = txl.load_state_dict(mem_model.state_dict(), strict=False).unexpected_keys
    assert sorted(unexpected) == ["layers.1.attn.gate", "layers.1.attn.memory.scale"]
    if not knn_rope:  # the official configuration: no position encoding at the kNN layer
        layer = txl.layers[1].attn.memory
        forward = layer.forward
        layer.forward = lambda q, k, v, gate, state, rotary, kv=None: forward(q, k, v, gate, state, no_rotary, kv)
    with torch.no_grad():
        mem_model.layers[1].attn.gate.fill_(-40.0)
        ids = torch.randint(0, 259, (B, 6 * N), generator=torch.Generator().manual_seed(2))
        ref = txl(ids).logits
        torch.testing.assert_close(mem_model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mem_model.stream(ids).logits, ref, rtol=1e-5, atol=1e-5)
        mem_model.layers[1].attn.gate.fill_(0.0)  # and the gate does matter
        assert not torch.allclose(mem_model(ids).logits, ref, rtol=1e-3, atol=1e-3)
    if not knn_rope:  # RoPE off at that layer is a different model from plain Transformer-XL
        with torch.no_grad():
            assert not torch.allclose(model(memory="txl")(ids).logits, ref, rtol=1e-3, atol=1e-3)


def test_a_store_as_long_as_the_sample_reads_what_a_larger_one_does():
    """No token is evicted from a store at least as long as the sample, so its reads, parallel and streamed, are a
    larger store's: a recipe of short samples may keep a smaller store (make recall-grid does) and lose nothing."""
    ids = torch.randint(0, 259, (B, 6 * N), generator=torch.Generator().manual_seed(2))
    # The last segment reads the 5 N tokens before it: a store one slot shorter has evicted one of them.
    exact, larger, short = (model(knn_size=c) for c in (6 * N, 500, 5 * N - 1))
    with torch.no_grad():
        for forward in ("__call__", "stream"):
            ref = getattr(larger, forward)(ids).logits
            torch.testing.assert_close(getattr(exact, forward)(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(short.stream(ids).logits, ref, rtol=1e-4, atol=1e-4)  # one token evicted shows


def test_eval_knn_size_is_the_store_outside_training():
    """memory.eval_knn_size: a store of knn_size slots in training and of eval_knn_size in eval mode, so a model
    trained on short samples with a small store reads a long prompt whole. In eval mode it equals a model built with
    knn_size = eval_knn_size (the same weights), and in training one with the training size."""
    ids = torch.randint(0, 259, (B, 6 * N), generator=torch.Generator().manual_seed(3))
    grown, small, big = model(knn_size=2 * N, eval_knn_size=500), model(knn_size=2 * N), model(knn_size=500)
    mem = grown.layers[1].attn.memory
    assert mem.empty_state(B, "cpu", torch.float32).knn_k.shape[2] == 500  # model() puts it in eval mode
    with torch.no_grad():
        for forward in ("__call__", "stream"):
            torch.testing.assert_close(getattr(grown, forward)(ids).logits, getattr(big, forward)(ids).logits,
                                       rtol=1e-5, atol=1e-5)
        assert not torch.allclose(grown.stream(ids).logits, small.stream(ids).logits, rtol=1e-4, atol=1e-4)
        grown.train(), small.train()
        assert mem.empty_state(B, "cpu", torch.float32).knn_k.shape[2] == 2 * N
        torch.testing.assert_close(grown(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-5)


def qkv(t: int, seed: int):
    return rand(B, H, t, D, seed=seed), rand(B, HK, t, D, seed=seed + 1), rand(B, HK, t, D, seed=seed + 2)


@pytest.mark.parametrize("knn_size, mem_len, knn_rope", [(20, N, False), (64, N, True), (20, 0, False),
                                                         (13, 5, True)])
def test_parallel_forward_equals_segment_by_segment(knn_size, mem_len, knn_rope, monkeypatch):
    """Outputs, states and gradients, from a document start and from a carried state; the store wraps for
    knn_size 20 and 13 (a window that does not end on a segment boundary). Queries go 5 rows at a time."""
    monkeypatch.setattr(memorizing, "CHUNK", 5)
    mem, m = knn(knn_size=knn_size, mem_len=mem_len, knn_rope=knn_rope, top_k=5)
    gate = rand(H, seed=4)
    with torch.no_grad():
        _, carried = mem(*qkv(3 * N, seed=20), gate, None, m.rotary)
    for state in (None, carried):
        results = []
        for forward in (mem.forward, lambda *a: Memory.forward(mem, *a)):
            q, k, v = (x.requires_grad_() for x in qkv(6 * N, seed=10))
            g = gate.clone().requires_grad_()
            mem.scale.grad = None
            out, new = forward(q, k, v, g, state, m.rotary)
            (out * rand(*out.shape, seed=5)).sum().backward()
            results.append((out, new, [q.grad, k.grad, v.grad, g.grad, mem.scale.grad.clone()]))
        (out_a, state_a, grads_a), (out_b, state_b, grads_b) = results
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
        assert isinstance(state_a, KNNState)
        for a, b in zip(state_a, state_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_retrieve_then_write_and_stop_gradient():
    """With the gate open (memory only) segment s reads only segments before it: its own keys and values, and
    later ones, change nothing in it; gradients reach q through the memory but never the stored keys."""
    mem, m = knn(knn_size=64, top_k=64, mem_len=0)  # every earlier key retrieved
    gate = torch.full((H,), 40.0)
    q, k, v = qkv(4 * N, seed=30)
    p = 2 * N + 3
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p] += 1.0
    v2[:, :, p] += 1.0
    with torch.no_grad():
        a, _ = mem(q, k, v, gate, None, m.rotary)
        b, _ = mem(q, k2, v2, gate, None, m.rotary)
    torch.testing.assert_close(a[:, :, : 3 * N], b[:, :, : 3 * N])  # segment 2 itself holds p
    assert not torch.allclose(a[:, :, 3 * N:], b[:, :, 3 * N:], rtol=1e-3, atol=1e-3)
    q, k, v = (x.requires_grad_() for x in qkv(4 * N, seed=30))
    out, _ = mem(q, k, v, gate, None, m.rotary)
    out[:, :, 3 * N:].sum().backward()
    assert q.grad[:, :, 3 * N:].norm(dim=-1).min() > 0
    assert k.grad[:, :, : 3 * N].abs().max() < 1e-12 and v.grad[:, :, : 3 * N].abs().max() < 1e-12


def test_fifo_wrap_around_returns_a_planted_key_and_forgets_an_evicted_one():
    mem, m = knn(knn_size=20, top_k=1, mem_len=0)
    q, k, v = qkv(4 * N, seed=40)
    kept, gone = rand(D, seed=41), rand(D, seed=42)
    k[:, :, 21], v[:, :, 21] = kept, 7.0  # slot 21 % 20 = 1: written after the ring wrapped
    k[:, :, 2], v[:, :, 2] = gone, -7.0  # evicted by token 22
    q[:, :, 27], q[:, :, 28] = 3.0 * kept, gone  # segment 3 (tokens 24 ..) asks for both
    gate = torch.full((H,), 40.0)
    with torch.no_grad():
        out, _ = mem(q, k, v, gate, None, m.rotary)
        torch.testing.assert_close(out[:, :, 27], torch.full((B, H, D), 7.0))
        assert (out[:, :, 28] > -6.0).all()
        state = mem.write(mem.write(mem.write(None, k[:, :, :N], v[:, :, :N]), k[:, :, N:2 * N],
                                    v[:, :, N:2 * N]), k[:, :, 2 * N:3 * N], v[:, :, 2 * N:3 * N])
        read, _ = mem.read(q[:, :, 27:29], state)
    assert (state.ptr == 4).all()
    torch.testing.assert_close(read[:, :, 0], torch.full((B, H, D), 7.0))
    assert (read[:, :, 1] > -6.0).all()


def test_per_row_reset_masks_one_row_out():
    """Clearing one row's valid flags (its keys left in place) equals a fresh start for that row; the other row
    carries on. The tail is long enough for the row's ring to wrap from a non-zero pointer."""
    m = model()
    ids = torch.randint(0, 259, (B, 6 * N), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        states = m(ids[:, : 2 * N]).states
        reset = []
        for s in states:
            s = s._replace(valid=s.valid.clone())
            s.valid[0] = False
            if isinstance(s, KNNState):
                assert s.ptr[0] != 0
                s = s._replace(knn_valid=s.knn_valid.clone())
                s.knn_valid[0] = False
            reset.append(s)
        fresh = m(ids[:1, 2 * N:]).logits[0]
        carried = m(ids[1:]).logits[0, 2 * N:]
        for out in (m(ids[:, 2 * N:], reset).logits, m.stream(ids[:, 2 * N:], reset).logits):
            torch.testing.assert_close(out[0], fresh, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1], carried, rtol=1e-5, atol=1e-5)


def test_top_k_attention_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(1, 2, 6, 4, dtype=torch.float64, generator=g)
    values = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 6, (1, 2, 3, 3), generator=g)
    hit = torch.rand(1, 2, 3, 3, generator=g) > 0.3
    hit[0, 0, 0] = False  # a row with nothing to read
    assert torch.autograd.gradcheck(TopKAttention.apply, (q, keys, values, idx, hit))
    assert (TopKAttention.apply(q, keys, values, idx, hit)[0, 0, 0] == 0).all()


def test_the_gate_and_scale_sit_at_the_knn_layer_only():
    m = build_model("tiny", memory="memorizing", n_layers=4)  # knn_layer null: round(0.75 * 4) = 3
    assert m.gate_layers() == [2] and (m.layers[2].attn.gate == 0).all()
    assert sorted(name for name, _ in m.memory_parameters()) == ["layers.2.attn.gate", "layers.2.attn.memory.scale"]
    assert build_model("lm_paper", memory="memorizing", n_layers=2, dim=64, n_heads=2, n_kv_heads=2,
                       head_dim=32, vocab_size=50).gate_layers() == [1]  # round(1.5) = 2, 1-indexed


def test_footprint_counts_the_filled_store():
    cfg = FLAVOURS["lm_paper"]
    fp = memory_class("memorizing").footprint(cfg, {"mem_len": 2048, "knn_size": 65000}, 32768)
    xl = 2 * 128 * 8 * 2048 * 12
    assert fp.paper_floats == xl + 2 * 128 * 8 * 65000
    assert fp.state_floats == xl + 2 * 128 * 8 * 32768 and fp.state_bytes == 2 * fp.state_floats


@pytest.mark.parametrize("key, value", [("knn_layer", 0), ("knn_layer", 3), ("top_k", 0), ("knn_size", -5),
                                        ("knn_rope", "yes"), ("mem_len", -1), ("eval_knn_size", 0)])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"^memory.{key}: "):
        build_model("tiny", memory="memorizing", memory_args={key: value})


def test_top_k_attention_is_fp32_under_autocast():
    """Mixed precision: bf16 keys and values, autocast on; the retrieval and its gradient stay fp32 and match
    the same call without autocast."""
    from infini_bench.memories.memorizing import TopKAttention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=g, requires_grad=True)
    keys, values = torch.randn(1, 2, 10, 8, generator=g).bfloat16(), torch.randn(1, 2, 10, 8, generator=g).bfloat16()
    idx = torch.randint(0, 10, (1, 2, 6, 3), generator=g)
    hit = torch.ones(1, 2, 6, 3, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TopKAttention.apply(q, keys, values, idx, hit)
    assert out.dtype == torch.float32
    (dq,) = torch.autograd.grad(out.square().sum(), q)
    ref = TopKAttention.apply(q, keys, values, idx, hit)
    (ref_dq,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dq, ref_dq)


def test_streamed_evaluation_writes_the_store_in_place_and_training_does_not():
    """Under inference mode (prefill, decoding) each segment goes into the ring's own tensors, not into a copy of
    every slot (most of the cost of a store that holds a 1M-token prompt); the result is checked against the
    parallel forward by test_memories' decoding tests. Training keeps the functional write its gradient needs."""
    from infini_bench.generate import feed, new_state

    m = model(knn_size=1000).eval()
    layer = next(i for i, b in enumerate(m.layers) if b.attn.memory.knn)
    ids = torch.randint(0, 256, (B, 5 * N), generator=torch.Generator().manual_seed(0))
    state = new_state(m, B)
    feed(m, ids[:, :N], state)
    ring = state.states[layer].knn_k
    feed(m, ids[:, N:], state)
    assert state.states[layer].knn_k.data_ptr() == ring.data_ptr() and int(state.states[layer].ptr[0]) == 5 * N
    out = m(ids[:, :N])
    again = m(ids[:, N: 2 * N], out.states)
    assert again.states[layer].knn_k.data_ptr() != out.states[layer].knn_k.data_ptr()
    assert int(out.states[layer].ptr[0]) == N  # the state the second call read is as it was

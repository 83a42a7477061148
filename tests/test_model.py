"""The decoder: parallel == streaming, causality, and the rule='none' / closed-gate reductions."""
import pytest
import torch

from infini_bench.memories import memory_names
from infini_bench.model import build_model
from infini_bench.model_config import FLAVOURS


def tiny(rule="linear", **kw):
    torch.manual_seed(0)
    model = build_model("tiny", memory=rule, segment_len=16, **kw).eval()
    with torch.no_grad():  # open the gates away from 0.5 so the memory path matters
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
    return model


def tokens(t=100, seed=1):
    return torch.randint(0, 259, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
def test_parallel_equals_streaming(rule):
    model, ids = tiny(rule), tokens()
    with torch.no_grad():
        parallel = model(ids).logits
    streamed = model.stream(ids)
    torch.testing.assert_close(streamed.logits, parallel, rtol=1e-4, atol=1e-4)
    last = model.stream(ids, last_only=True)
    torch.testing.assert_close(last.logits, parallel[:, -1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_causal(rule):
    model, ids = tiny(rule), tokens()
    changed = ids.clone()
    changed[:, 60] = (changed[:, 60] + 1) % 259
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :60], b[:, :60])
    assert (a[:, 60:] - b[:, 60:]).abs().max() > 1e-4
    assert (a[:, 64:] - b[:, 64:]).abs().max() > 1e-4  # later segments see it through the memory


def plain_local_transformer(model, ids):
    """A plain Llama forward with a block-diagonal causal mask and absolute RoPE positions: no segment loop."""
    cfg = model.cfg
    b, t = ids.shape
    pos = torch.arange(t)
    mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] // cfg.segment_len == pos[None, :] // cfg.segment_len)
    x = model.embed(ids)
    for layer in model.layers:
        a = layer.attn
        h = layer.attn_norm(x)
        q = a.wq(h).view(b, t, cfg.n_heads, -1).transpose(1, 2)
        k = a.wk(h).view(b, t, cfg.n_kv_heads, -1).transpose(1, 2)
        v = a.wv(h).view(b, t, cfg.n_kv_heads, -1).transpose(1, 2)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        q, k = model.rotary(q), model.rotary(k)
        scores = (q @ k.transpose(-1, -2)) / cfg.head_dim**0.5
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + a.wo(att.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.lm_head(model.norm(x))


def test_rule_none_is_a_segment_local_transformer():
    model, ids = tiny("none"), tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain_local_transformer(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_closed_gates_reduce_to_local_attention(rule):
    model, ids = tiny(rule), tokens()
    with torch.no_grad():
        opened = model(ids).logits
        for layer in model.layers:
            layer.attn.gate.fill_(-1e4)  # sigmoid(beta) -> 0
        closed = model(ids).logits
        local = plain_local_transformer(model, ids)
    torch.testing.assert_close(closed, local, rtol=1e-4, atol=1e-4)
    assert (opened - local).abs().max() > 1e-3


def test_training_reaches_every_segment_and_gate():
    model = tiny("linear").train()
    ids = tokens(64)
    logits = model(ids).logits
    logits[:, 48:].sum().backward()  # loss on the last segment only
    for layer in model.layers:
        assert layer.attn.gate.grad.abs().sum() > 0
    assert model.embed.weight.grad[ids[:, :16].flatten()].abs().sum() > 0  # through the memory, across segments


def test_activation_checkpointing_gives_same_gradients():
    ids = tokens(64)
    grads = []
    for ckpt in (False, True):
        model = tiny("delta", activation_checkpointing=ckpt).train()
        model(ids).logits.square().mean().backward()
        grads.append(model.layers[0].attn.wk.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_paper_memory_footprint():
    fp = FLAVOURS["lm_paper"].footprint(32768)
    assert fp.paper_floats == fp.state_floats == 128 * 129 * 8 * 12  # 1.59M, paper Table 2
    assert fp.state_bytes == 4 * fp.state_floats  # M and z are fp32


def test_bad_flavour_and_rule():
    with pytest.raises(ValueError, match="model.flavour: 'huge' is not one of tiny"):
        build_model("huge")
    with pytest.raises(ValueError, match="memory: 'foo' is not one of " + ", ".join(memory_names())):
        build_model("tiny", memory="foo")


def test_rotary_frequencies_stay_fp32_in_a_bf16_model():
    x = torch.randn(1, 1, 2048, 32)
    ref = build_model("tiny").rotary(x)
    model = build_model("tiny").to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary(x.bfloat16()).float(), ref, rtol=2e-2, atol=2e-2)


def test_model_trains_after_decoding_in_inference_mode():
    model = tiny("linear")
    with torch.inference_mode():  # builds the rotary cache, as generation does
        model.stream(tokens(40))
    model.train()
    model(tokens(40)).logits.sum().backward()  # the cached cos/sin must not be inference tensors
    assert model.layers[0].attn.wq.weight.grad is not None


@pytest.mark.slow
def test_compiled_blocks_stream_the_same_function():
    """model.compile_blocks (trainer.compile=true; 2x faster 1M-token prefill on an H200) changes no number
    beyond fp32 rounding and no parameter name (checkpoints stay loadable). About 15 s of compiling on CPU."""
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=16, n_layers=1, memory="delta").eval()
    ids = torch.randint(0, 259, (2, 48))
    names = [n for n, _ in model.named_parameters()]
    traced = []  # whether each call of a block's attention ran inside torch.compile's tracing
    model.layers[0].attn.register_forward_pre_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    with torch.no_grad():
        expected = model(ids).logits
        model.compile_blocks()
        model.compile_blocks()  # idempotent
        streamed = torch.cat([out.logits for out in model.segments(ids)], dim=1)
    assert traced[0] is False and any(traced[1:])  # eager first, then through the compiler
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in model.named_parameters()] == names


def shifted(rule: str):
    """A tiny model with token_shift and a shift far from its zero initialisation."""
    model = tiny(rule, token_shift=True)
    with torch.no_grad():
        model.token_shift.normal_(0, 1)
    return model


def test_token_shift_adds_the_previous_embedding_within_a_segment_only():
    model, ids = shifted("linear").double(), tokens(40)
    n, e, s = model.cfg.segment_len, model.embed.weight, model.token_shift
    want = torch.stack([torch.stack([e[row[t]] + (s * e[row[t - 1]] if t % n else 0) for t in range(len(row))])
                        for row in ids])  # a loop over positions: no shift at 0, 16, 32
    torch.testing.assert_close(model.embed_tokens(ids), want)
    assert not torch.equal(want, e[ids])  # the shift changes the inputs the blocks see


@pytest.mark.parametrize("rule", ["linear", "full", "rmt"])
def test_token_shift_parallel_equals_streaming(rule):
    model, ids = shifted(rule), tokens(100)
    with torch.no_grad():
        parallel = model(ids).logits
        plain = build_model("tiny", memory=rule, segment_len=16)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "token_shift"})
        assert not torch.allclose(plain.eval()(ids).logits, parallel, atol=1e-3)  # the shift is wired in
    torch.testing.assert_close(model.stream(ids).logits, parallel, rtol=1e-4, atol=1e-4)


def test_token_shift_starts_at_zero_and_counts_as_a_parameter():
    model = tiny("linear", token_shift=True)
    plain = tiny("linear")
    ids = tokens(40)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)  # the same draws, and a shift of zero
    assert model.cfg.num_params() == plain.cfg.num_params() + model.cfg.dim
    assert model.cfg.num_params() - sum(p.numel() for p in model.parameters()) == \
        plain.cfg.num_params() - sum(p.numel() for p in plain.parameters())


def test_token_shift_decodes_as_the_parallel_forward():
    """Token by token, in uneven chunks and through the fixed-shape step a CUDA graph captures: the token before
    each chunk comes from the cache, and a segment's first token still gets nothing from the one before it."""
    from infini_bench.generate import StaticDecoder, decode_step, feed, new_state, prefill

    for rule in ("linear", "full", "rmt"):
        model, ids = shifted(rule), tokens(70)
        with torch.no_grad():
            parallel = model(ids).logits
        last, state = prefill(model, ids[:, :21])
        steps = [last] + [decode_step(model, ids[:, t], state) for t in range(21, 70)]
        torch.testing.assert_close(torch.stack(steps, 1), parallel[:, 20:], rtol=1e-4, atol=1e-4)
        state = new_state(model, 2)
        chunks = [feed(model, ids[:, a:b], state, last_only=False) for a, b in [(0, 7), (7, 40), (40, 41), (41, 70)]]
        torch.testing.assert_close(torch.cat(chunks, 1), parallel, rtol=1e-4, atol=1e-4)
        if rule == "linear":  # a memory the fixed-shape step can hold
            last, state = prefill(model, ids[:, :21])
            decoder = StaticDecoder(model, state, graph=False)
            steps = [last] + [decoder.step(ids[:, t]) for t in range(21, 70)]
            torch.testing.assert_close(torch.stack(steps, 1), parallel[:, 20:], rtol=1e-4, atol=1e-4)

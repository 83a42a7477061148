"""RMT against second computations: no memory tokens is `none`; the mask, probed through the Jacobian, is the
one written out here from its rule; a float64 forward written from the description; gradients reach M_0 from
every later segment and bptt_depth cuts them; recomputing segments and streaming change nothing."""
import pytest
import torch
import torch.nn.functional as F

from infini_bench.generate import decode_step, prefill
from infini_bench.attention import local_attention
from infini_bench.memories.rmt import rows_attention, segment_mask
from infini_bench.model import build_model

N, M = 8, 3


def rmt(seed: int = 0, **args):
    torch.manual_seed(seed)
    return build_model("tiny", memory="rmt", memory_args={"num_mem_tokens": M, **args}, segment_len=N,
                       n_layers=2).eval()


def tokens(t: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 259, (b, t), generator=torch.Generator().manual_seed(seed))


def rule_mask(m: int, length: int, causal: bool) -> torch.Tensor:
    """The mask over [read; text; write] from its rule, one entry at a time."""
    s = 2 * m + length
    allow = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            if causal:
                allow[i, j] = j <= i
            elif i < m:  # read rows: every read row
                allow[i, j] = j < m
            elif i < m + length:  # text rows: the read rows and the text causally, no write row
                allow[i, j] = j < m or m <= j <= i
            else:  # write rows: everything
                allow[i, j] = True
    return allow


def reference(model, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """The model's weights in float64, one segment at a time: [M; text; M] through each layer with one masked
    softmax over RoPE positions 0 .. 2m + L - 1, the final-norm write rows as the next M; text logits only."""
    cfg, m = model.cfg, model.stack_memory.rows

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight.double()

    def lin(x, layer):
        return x @ layer.weight.double().T

    def rope(x, pos):
        ang = pos.double()[:, None] * model.rotary.inv_freq.double()[None, :]
        ang = torch.cat([ang, ang], -1)
        x1, x2 = x.chunk(2, -1)
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    b = ids.shape[0]
    memory = model.stack_memory.initial.double().expand(b, m, cfg.dim)
    outs = []
    for start in range(0, ids.shape[1], N):
        text = model.embed.weight.double()[ids[:, start: start + N]]
        length = text.shape[1]
        x = torch.cat([memory, text, memory], 1)
        s = x.shape[1]
        pos, allow = torch.arange(s), rule_mask(m, length, causal)
        for layer in model.layers:
            att = layer.attn
            h = rms(x, layer.attn_norm)
            q = lin(h, att.wq).view(b, s, cfg.n_heads, -1).transpose(1, 2)
            k = lin(h, att.wk).view(b, s, cfg.n_kv_heads, -1).transpose(1, 2)
            v = lin(h, att.wv).view(b, s, cfg.n_kv_heads, -1).transpose(1, 2)
            g = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            scores = rope(q, pos) @ rope(k, pos).transpose(-1, -2) / cfg.head_dim ** 0.5
            o = scores.masked_fill(~allow, float("-inf")).softmax(-1) @ v
            x = x + lin(o.transpose(1, 2).reshape(b, s, -1), att.wo)
            h = rms(x, layer.ffn_norm)
            x = x + lin(F.silu(lin(h, layer.ffn.w_gate)) * lin(h, layer.ffn.w_up), layer.ffn.w_down)
        x = rms(x, model.norm)
        outs.append(x[:, m: m + length])
        memory = x[:, m + length:]
    return lin(torch.cat(outs, 1), model.lm_head)


@pytest.mark.parametrize("causal", [False, True])
def test_equals_float64_reference(causal):
    """Logits (parallel and streamed) and, through every segment, the gradients of every parameter."""
    model, ids = rmt(causal=causal), tokens(4 * N + 3)
    ref = reference(model, ids, causal)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.stream(ids).logits, ref.float(), rtol=1e-4, atol=1e-4)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model.train()(ids).logits.pow(2).mean(), list(params.values()))
    ref_grads = torch.autograd.grad(ref.pow(2).mean(), list(params.values()))
    for name, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-3, atol=1e-6, msg=name)


def test_m0_rows_are_independent():
    """Random rows, redrawn by init_memory_parameters (after a pretrained load): identical rows would stay
    identical through every layer."""
    model = rmt()
    before = model.stack_memory.initial.detach().clone()
    model.init_memory_parameters()
    after = model.stack_memory.initial.detach()
    assert torch.linalg.matrix_rank(after) == M and not torch.equal(before, after)


@pytest.mark.parametrize("blocks", [False, True], ids=["mask", "blocks"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [N, 5])
def test_mask_probed_through_the_jacobian(causal, length, blocks):
    """Output row i depends on input row j exactly where the rule allows it (two layers of a mask that is
    already transitive): text rows never see write rows; every write row depends on every text row. Both for
    the mask given as a tensor (decoding) and as a segment's blocks (`rows_attention`, training)."""
    model = rmt(causal=causal)
    assert torch.equal(segment_mask(M, length, causal), rule_mask(M, length, causal))
    x = torch.randn(1, 2 * M + length, model.cfg.dim, requires_grad=True)
    if blocks:
        h, _ = model.run_rows(x)
    else:
        h, _ = model.run_rows(x, segment_mask(M, length, causal), [None] * 2)
    depends = torch.stack([torch.autograd.grad(h[0, i].sum(), x, retain_graph=True)[0][0].abs().sum(-1) > 0
                           for i in range(h.shape[1])])
    assert torch.equal(depends, rule_mask(M, length, causal))
    if not causal:
        assert not depends[M: M + length, M + length:].any() and depends[M + length:, M: M + length].all()


def test_no_memory_tokens_is_none():
    model, ids = rmt(num_mem_tokens=0), tokens(5 * N + 3)
    none = build_model("tiny", memory="none", segment_len=N, n_layers=2).eval()
    result = none.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["stack_memory.initial"]
    with torch.no_grad():
        expected = none(ids).logits
        torch.testing.assert_close(model(ids).logits, expected)
    last, state = prefill(model, ids[:, : 2 * N + 3])
    steps = [last] + [decode_step(model, ids[:, t], state) for t in range(2 * N + 3, ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 2 * N + 2:], rtol=1e-5, atol=1e-5)


def test_loss_of_every_later_segment_reaches_m0():
    model = rmt().train()
    logits = model(tokens(4 * N)).logits
    for t in range(1, 4):
        (grad,) = torch.autograd.grad(logits[:, t * N: (t + 1) * N].sum(), model.stack_memory.initial,
                                      retain_graph=True)
        assert grad.abs().max() > 0, t


def _embedding_grads(model, ids: torch.Tensor, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d (segment's logits) / d M_0 and / d the token embeddings (B, T, dim)."""
    emb = {}
    handle = model.embed.register_forward_hook(lambda mod, inp, out: emb.setdefault("x", out))
    logits = model(ids).logits
    handle.remove()
    return torch.autograd.grad(logits[:, segment * N: (segment + 1) * N].sum(),
                               [model.stack_memory.initial, emb["x"]], allow_unused=True)


def test_bptt_depth_detaches_every_k_segments():
    """bptt_depth=2: the memory is cut after segments 1 and 3 (1-indexed), so segment index 1 reaches M_0,
    index 2 reaches nothing before it, index 3 reaches index 2's tokens but not index 1's."""
    model, ids = rmt(bptt_depth=2).train(), tokens(4 * N)
    m0, emb = _embedding_grads(model, ids, 1)
    assert m0.abs().max() > 0 and emb[:, :N].abs().max() > 0
    m0, emb = _embedding_grads(model, ids, 2)
    assert (m0 is None or m0.abs().max() == 0) and emb[:, : 2 * N].abs().max() == 0
    m0, emb = _embedding_grads(model, ids, 3)
    assert emb[:, 2 * N: 3 * N].abs().max() > 0 and emb[:, : 2 * N].abs().max() == 0


def test_training_forward_equals_streaming_and_recomputed_segments():
    """In training, one call equals segments fed one at a time with the memory carried (same gradients too),
    and recomputing each segment in the backward pass changes neither."""
    ids = tokens(3 * N + 5)

    def run(model, stream: bool):
        model.train().zero_grad()
        if stream:
            states, logits = None, []
            for start in range(0, ids.shape[1], N):
                out = model(ids[:, start: start + N], states)
                states, logits = out.states, logits + [out.logits]
            logits = torch.cat(logits, 1)
        else:
            logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    logits, grads = run(rmt(), stream=False)
    for model, stream in ((rmt(), True), (rmt(checkpoint_segments=True), False)):
        other_logits, other_grads = run(model, stream)
        torch.testing.assert_close(other_logits, logits)
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_state_is_the_footprint():
    model = rmt()
    with torch.no_grad():
        states = model(tokens(2 * N, b=1)).states
    fp = model.cfg.footprint(2 * N)
    assert states.shape == (1, M, model.cfg.dim) and states.numel() == fp.state_floats
    assert fp.paper_floats == model.cfg.dim * M * model.cfg.n_layers * 2


@pytest.mark.parametrize("args, key", [({"num_mem_tokens": -1}, "memory.num_mem_tokens"),
                                       ({"bptt_depth": 1.5}, "memory.bptt_depth"),
                                       ({"causal": "yes"}, "memory.causal")])
def test_bad_arguments_are_named(args, key):
    with pytest.raises(ValueError, match=key):
        rmt(**args)


@pytest.mark.parametrize("m", [0, 1, M])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("flash", [True, False])
def test_rows_attention_equals_the_masked_attention(m, causal, flash):
    """The segment's mask as three flash-friendly blocks equals one SDPA under the mask, in float64, outputs
    and gradients (GQA: 4 query heads on 2 kv heads), with the text rows' cached bias or an explicit mask."""
    model = rmt()
    length, d, gen = 5, model.cfg.head_dim, torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 2 * m + length, d, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 2 * m + length, d, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    blocks = rows_attention(q, k, v, model.rotary, m, length, causal, flash)
    masked = local_attention(q, k, v, model.rotary, None, visible=segment_mask(m, length, causal))
    torch.testing.assert_close(blocks, masked, rtol=1e-12, atol=1e-12)
    w = torch.randn(blocks.shape, dtype=torch.float64, generator=gen)
    grads = [torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (blocks, masked)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

"""The functional core against a float64 loop that follows the paper's equations token by token."""
import pytest
import torch

from infini_bench.compressive import MemoryState, infini_attention
from infini_bench.blocks import Rotary
from infini_bench.model_config import ModelConfig


def naive(q, k, v, beta, n, rule, rotary=None, empty_read="zero", read_scale=None):
    """Float64, one segment and one query at a time, written straight from Eqs. 6-10; M_0 = 0 reads A_mem = 0
    (empty_read="zero") or, the ablation, leaves A_dot unmixed in the first segment ("local"); with `read_scale`
    (H * D_v,), A_mem is divided by its root mean square over D_v and scaled before the mix (the ablation)."""
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    b, h, t, d = q.shape
    g = h // k.shape[1]
    sig = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    out = torch.zeros(b, h, t, v.shape[-1], dtype=torch.float64)
    M = z = None
    for s0 in range(0, t, n):
        sl = slice(s0, min(s0 + n, t))
        qs, ks, vs = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        qr, kr = (rotary(qs), rotary(ks)) if rotary else (qs, ks)
        L = qs.shape[2]
        for hh in range(h):
            kv = hh // g
            for i in range(L):
                scores = torch.einsum("bd,bjd->bj", qr[:, hh, i], kr[:, kv, : i + 1]) / d**0.5
                a_dot = torch.einsum("bj,bje->be", scores.softmax(-1), vs[:, kv, : i + 1])
                if rule == "none" or (M is None and empty_read == "local"):
                    out[:, hh, s0 + i] = a_dot
                elif M is None:  # Eq. 10 with A_mem = 0
                    out[:, hh, s0 + i] = (1 - torch.sigmoid(beta[hh])) * a_dot
                else:
                    sq = sig(qs[:, hh, i])  # un-rotated
                    a_mem = torch.einsum("bd,bde->be", sq, M[:, kv]) / (sq * z[:, kv]).sum(-1, keepdim=True)
                    if read_scale is not None:
                        scale = read_scale.double().view(h, -1)[hh]
                        a_mem = a_mem / (a_mem.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * scale
                    gate = torch.sigmoid(beta[hh])
                    out[:, hh, s0 + i] = gate * a_mem + (1 - gate) * a_dot
        if rule == "none":
            continue
        sk = sig(ks)
        if M is None:
            M = torch.zeros(b, k.shape[1], d, v.shape[-1], dtype=torch.float64)
            z = torch.zeros(b, k.shape[1], d, dtype=torch.float64)
            delta_v = vs
        elif rule == "delta":
            delta_v = vs - (sk @ M) / (sk @ z.unsqueeze(-1))
        else:
            delta_v = vs
        M = M + sk.transpose(-1, -2) @ delta_v
        z = z + sk.sum(2)
    return out, M, z


def make_inputs(h=4, hk=2, t=40, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, t, d, generator=g)
    k = torch.randn(2, hk, t, d, generator=g)
    v = torch.randn(2, hk, t, d, generator=g)
    beta = torch.randn(h, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), beta


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("t", [40, 37, 5], ids=["full-segments", "partial-last", "one-partial"])
@pytest.mark.parametrize("empty_read", ["zero", "local"])
def test_matches_float64_loop(rule, heads, t, empty_read):
    q, k, v, beta = make_inputs(*heads, t=t)
    out, state = infini_attention(q, k, v, beta, segment_len=8, rule=rule, empty_read=empty_read)
    ref, M, z = naive(q, k, v, beta, 8, rule, empty_read=empty_read)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if rule == "none":
        assert state is None
    else:
        torch.testing.assert_close(state.M, M.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.z, z.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_fp32_matches_float64_with_rotary(rule):
    q, k, v, beta = make_inputs(t=37)
    rot = Rotary(ModelConfig(head_dim=8))
    out, _ = infini_attention(q, k, v, beta, segment_len=8, rule=rule, rotary=rot)
    rot64 = lambda x: rot(x.float()).double()  # noqa: E731
    ref, _, _ = naive(q, k, v, beta, 8, rule, rotary=rot64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # The rotation changes the answer, so the test above would see it applied in the wrong place.
    plain, _ = infini_attention(q, k, v, beta, segment_len=8, rule=rule)
    assert (plain - out).abs().max() > 1e-2


@pytest.mark.parametrize("rule", ["linear", "delta", "none"])
@pytest.mark.parametrize("chunks", [[16, 16, 8], [8, 24, 5], [37]])
def test_chunked_with_state_equals_whole(rule, chunks):
    q, k, v, beta = make_inputs(t=sum(chunks))
    whole, whole_state = infini_attention(q, k, v, beta, segment_len=8, rule=rule)
    outs, state, start = [], None, 0
    for c in chunks:
        sl = slice(start, start + c)
        o, state = infini_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta, segment_len=8, rule=rule,
                                    state=state)
        outs.append(o)
        start += c
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)
    if rule != "none":
        torch.testing.assert_close(state.M, whole_state.M)
        torch.testing.assert_close(state.z, whole_state.z)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_bf16_inputs_finite_and_state_fp32(rule):
    q, k, v, beta = make_inputs(t=256, d=16, dtype=torch.bfloat16)
    q, k, v = q * 8, k * 8, v * 8  # large activations: a bf16 memory would lose or overflow
    out, state = infini_attention(q, k, v, beta, segment_len=16, rule=rule)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert state.M.dtype == torch.float32 and state.z.dtype == torch.float32
    ref, M, _ = naive(q.float(), k.float(), v.float(), beta, 16, rule)
    assert ((out.double() - ref).norm() / ref.norm()) < 2e-2
    torch.testing.assert_close(state.M.double(), M, rtol=2e-2, atol=2e-2 * M.abs().max().item())


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_state_stays_fp32_under_autocast(rule):
    """Training runs under bf16 autocast, which turns matmul outputs into bf16: the memory must not follow."""
    q, k, v, beta = make_inputs(t=64, d=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = infini_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta, segment_len=16, rule=rule)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert state.M.dtype == torch.float32 and state.z.dtype == torch.float32
    ref, M, _ = naive(q, k, v, beta, 16, rule)
    assert ((out.double() - ref).norm() / ref.norm()) < 2e-2
    torch.testing.assert_close(state.M.double(), M, rtol=2e-2, atol=2e-2 * M.abs().max().item())


def test_output_is_laid_out_for_the_output_projection():
    """(B, H, T, D_v) viewed from (B, T, H, D_v) memory: the model's transpose + reshape before W_O is free."""
    q, k, v, beta = make_inputs(t=40)
    out, _ = infini_attention(q, k, v, beta, segment_len=8, rule="linear")
    assert out.transpose(1, 2).is_contiguous()


def test_first_segment_is_local_attention_scaled_by_the_gate_as_in_every_segment():
    q, k, v, beta = make_inputs(t=16)
    beta = torch.full_like(beta, 1.0)
    out, _ = infini_attention(q, k, v, beta, segment_len=8, rule="linear")
    local, _ = infini_attention(q, k, v, beta, segment_len=8, rule="none")
    torch.testing.assert_close(out[:, :, :8], (1 - torch.sigmoid(torch.tensor(1.0))) * local[:, :, :8])
    assert (out[:, :, 8:] - local[:, :, 8:]).abs().max() > 1e-2
    unscaled, _ = infini_attention(q, k, v, beta, segment_len=8, rule="linear", empty_read="local")
    torch.testing.assert_close(unscaled[:, :, :8], local[:, :, :8])  # the ablation: A_dot alone
    torch.testing.assert_close(unscaled[:, :, 8:], out[:, :, 8:])  # later segments do not depend on it


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("t", [40, 37], ids=["full-segments", "partial-last"])
def test_normalized_read_matches_float64_loop(rule, t):
    q, k, v, beta = make_inputs(4, 2, t=t)
    scale = torch.rand(4 * 8, generator=torch.Generator().manual_seed(3)) + 0.5
    out, _ = infini_attention(q, k, v, beta, segment_len=8, rule=rule, read_scale=scale)
    ref, _, _ = naive(q, k, v, beta, 8, rule, read_scale=scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    plain, _ = infini_attention(q, k, v, beta, segment_len=8, rule=rule)
    assert (out - plain)[:, :, 8:].abs().max() > 1e-2  # the option changes what later segments read


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_detached_memory_passes_no_gradient_from_a_read_into_earlier_writes(rule):
    from infini_bench.compressive import memory_read, memory_write

    grads = {}
    for backprop in ("full", "detached"):
        q, k, v, beta = make_inputs(t=16)
        q.requires_grad_(True), k.requires_grad_(True)
        out, _ = infini_attention(q, k, v, beta, segment_len=8, rule=rule, backprop=backprop)
        out[:, :, 8:].sum().backward()  # only the second segment's output
        streamed = memory_read(q[:, :, 8:], memory_write(k[:, :, :8], v[:, :, :8], rule, None), backprop=backprop)
        (k_grad_streamed,) = torch.autograd.grad(streamed.sum(), k, allow_unused=True)
        streamed_sum = 0 if k_grad_streamed is None else k_grad_streamed.abs().sum()
        grads[backprop] = (k.grad[:, :, :8].abs().sum(), streamed_sum, out.detach())
    assert grads["full"][0] > 0 and grads["full"][1] > 0
    assert grads["detached"][0] == 0 and grads["detached"][1] == 0
    torch.testing.assert_close(grads["detached"][2], grads["full"][2], rtol=0, atol=0)  # the same forward


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_fp32_products_keep_the_memory_exact_under_bf16_autocast(rule):
    """Under bf16 autocast, products="fp32" reads the memory as a float64 computation does (to fp32 rounding);
    the default products in bf16 are off by bf16's rounding. The option changes precision, not the function."""
    q, k, v, beta = make_inputs(4, 2, t=64)
    _, M, z = naive(q, k, v, beta, 8, rule)
    sq = torch.nn.functional.elu(q[:, :, -8:].double()) + 1
    g = q.shape[1] // k.shape[1]
    ref = (sq.view(2, 2, g, 8, 8) @ M.unsqueeze(2)) / (sq.view(2, 2, g, 8, 8) @ z.view(2, 2, 1, 8, 1))
    ref = ref.view(2, 4, 8, 8)
    from infini_bench.compressive import memory_read, memory_write

    errors = {}
    for products in ("activation", "fp32"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = None
            for s0 in range(0, 64, 8):
                state = memory_write(k[:, :, s0:s0 + 8].bfloat16(), v[:, :, s0:s0 + 8].bfloat16(), rule, state,
                                     products=products) if s0 < 64 else state
            # the last segment's queries read the memory of all 8 segments, as in the float64 loop's state
            a_mem = memory_read(q[:, :, -8:].bfloat16(), state, products=products)
        errors[products] = ((a_mem.double() - ref).abs().max() / ref.abs().max()).item()
    # bf16 inputs carry their own rounding (2^-9 relative), so even fp32 products are not exact; they must be
    # clearly better than products in bf16.
    assert errors["fp32"] < 0.5 * errors["activation"], errors


def test_memory_gets_gradients_from_later_segments():
    q, k, v, beta = make_inputs(t=16)
    k.requires_grad_(True)
    out, _ = infini_attention(q, k, v, beta, segment_len=8, rule="linear")
    out[:, :, 8:].sum().backward()  # only the second segment's output
    assert k.grad[:, :, :8].abs().sum() > 0  # reached the first segment's keys through the memory write


def test_given_state_is_read_by_first_segment():
    q, k, v, beta = make_inputs(t=8)
    state = MemoryState(torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8) + 0.5)
    with_mem, _ = infini_attention(q, k, v, beta, segment_len=8, state=state)
    without, _ = infini_attention(q, k, v, beta, segment_len=8)
    assert (with_mem - without).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [{"rule": "foo"}, {"segment_len": 0}, {"empty_read": "none"},
                                 {"products": "bf16"}, {"backprop": "none"}])
def test_bad_arguments_raise(bad):
    q, k, v, beta = make_inputs(t=8)
    kwargs = {"segment_len": 8, **bad}
    with pytest.raises(ValueError, match="rule|segment_len|empty_read|products|backprop"):
        infini_attention(q, k, v, beta, **kwargs)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_single_segment_read_write_match_the_sequence_call(rule):
    from infini_bench.compressive import memory_read, memory_write

    q, k, v, beta = make_inputs(t=24)
    whole, state_whole = infini_attention(q, k, v, beta, segment_len=8, rule=rule)
    state = None
    for s0 in range(0, 24, 8):
        sl = slice(s0, s0 + 8)
        if state is not None:  # segment s0 reads what segments before it wrote
            local, _ = infini_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta, segment_len=8, rule="none")
            gate = torch.sigmoid(beta).view(1, -1, 1, 1)
            mixed = gate * memory_read(q[:, :, sl], state) + (1 - gate) * local
            torch.testing.assert_close(mixed, whole[:, :, sl], rtol=1e-5, atol=1e-5)
        state = memory_write(k[:, :, sl], v[:, :, sl], rule, state)
    torch.testing.assert_close(state.M, state_whole.M)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_bf16_queries_far_below_zero_read_a_finite_memory(rule):
    """ELU + 1 computed as elu(x) + 1 cancels in bf16: for x <= -7 it is exactly 0 (exp(-7) = 9e-4 is below half of
    bf16's spacing at 1), so a query with every component that low read 0 / 0. A linear-memory recall model on an
    H200 (bf16) reached that at step 1,708 and its loss became NaN. The feature map must stay exp(x) there."""
    from infini_bench.compressive import memory_read, memory_write, sigma

    x = torch.tensor([-7.0, -9.0, -20.0, -3.0, 0.5])
    torch.testing.assert_close(sigma(x.bfloat16()).float(), torch.where(x > 0, x + 1, x.exp()), rtol=1e-2, atol=0)
    q, k, v, _ = make_inputs(4, 2, t=16)
    state = memory_write(k.bfloat16(), v.bfloat16(), rule, None)
    low = (q - 12.0).bfloat16()  # every component at or below -7
    a_mem = memory_read(low, state)
    assert torch.isfinite(a_mem).all()
    sq = torch.exp(low.double()).view(2, 2, 2, 16, 8)  # ELU + 1 is exp(x) for x < 0
    ref = ((sq @ state.M.double().unsqueeze(2)) / (sq @ state.z.double().view(2, 2, 1, 8, 1))).view(2, 4, 16, 8)
    assert ((a_mem.double() - ref).abs().max() / ref.abs().max()) < 2e-2

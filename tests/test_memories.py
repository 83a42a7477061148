"""The memory contract, for every registered memory: the segment-parallel forward, the segment-streaming
forward, cached decoding and the fixed-shape (CUDA-graph) decoder compute one function; it is causal; a
state carried across calls equals one call. Then each baseline against a second computation of its own."""
import pytest
import torch
import torch.nn.functional as F

from infini_bench.generate import StaticDecoder, decode_step, prefill
from infini_bench.memories import MEMORIES, memory_class, memory_names
from infini_bench.model import build_model
from infini_bench.model_config import FLAVOURS

N = 8
# Small settings where a memory's defaults are sized for the paper's model.
ARGS = {"memorizing": {"knn_size": 20, "top_k": 4, "knn_layer": 2}, "rmt": {"num_mem_tokens": 3}}


def tiny(memory: str, seed: int = 0, **args):
    torch.manual_seed(seed)
    model = build_model("tiny", memory=memory, memory_args={**ARGS.get(memory, {}), **args} or None,
                        segment_len=N, n_layers=2).eval()
    with torch.no_grad():  # gates away from 0.5 so the memory path matters
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
            if getattr(layer.attn.memory, "read_scale", None) is not None:  # a learned scale away from 1
                layer.attn.memory.read_scale.uniform_(0.5, 2.0)
    return model


# Every memory, plus the ablation options of Infini-attention: A_dot unscaled in a document's first segment,
# A_mem RMS-normalised, every memory product in fp32, the memory read detached.
ABLATIONS = [{"empty_read": "local"}, {"read_norm": "rms"}, {"products": "fp32"}, {"backprop": "detached"}]
CONVENTIONS = [(m, {}) for m in memory_names()] + [(m, a) for a in ABLATIONS for m in ("linear", "delta")]
CONVENTION_IDS = [m + "".join(f"-{k}_{v}" for k, v in a.items()) for m, a in CONVENTIONS]


def tokens(t: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 259, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("memory,args", CONVENTIONS, ids=CONVENTION_IDS)
def test_parallel_equals_streaming_and_chunks(memory, args):
    model, ids = tiny(memory, **args), tokens(5 * N + 3)
    with torch.no_grad():
        whole = model(ids)
        streamed = model.stream(ids)
        head = model(ids[:, : 2 * N])
        tail = model(ids[:, 2 * N:], head.states)  # a carried state equals one call (resume)
    torch.testing.assert_close(streamed.logits, whole.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([head.logits, tail.logits], 1), whole.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory,args", CONVENTIONS, ids=CONVENTION_IDS)
@pytest.mark.parametrize("prompt_len", [3 * N + 5, 2 * N, 5])  # 5: decoding starts inside the first segment
def test_decoding_equals_parallel(memory, args, prompt_len):
    """prefill + one token at a time, eager and through the fixed-shape step, across several segment ends."""
    model, ids = tiny(memory, **args), tokens(5 * N + 2)
    with torch.no_grad():
        parallel = model(ids).logits
    for static in (False, True):
        last, state = prefill(model, ids[:, :prompt_len])
        step = StaticDecoder(model, state, graph=False).step if static else lambda t: decode_step(model, t, state)
        steps = [last] + [step(ids[:, t]) for t in range(prompt_len, ids.shape[1])]
        torch.testing.assert_close(torch.stack(steps, 1), parallel[:, prompt_len - 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory", memory_names())
def test_causal(memory):
    model, ids = tiny(memory), tokens(4 * N)
    changed = ids.clone()
    changed[:, 2 * N + 3] = (changed[:, 2 * N + 3] + 1) % 259
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, : 2 * N + 3], b[:, : 2 * N + 3])
    assert not torch.allclose(a[:, 2 * N + 3], b[:, 2 * N + 3])


@pytest.mark.parametrize("memory", memory_names())
def test_trains_finite(memory):
    """A training step's forward equals the evaluation forward, and every parameter gets a finite gradient."""
    model, ids = tiny(memory), tokens(4 * N)
    with torch.no_grad():
        ref = model(ids).logits
    model.train()
    logits = model(ids).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("memory", memory_names())
def test_footprint_is_reported(memory):
    fp = build_model("tiny", memory=memory, memory_args=ARGS.get(memory)).cfg.footprint(1024)
    assert fp.state_bytes >= fp.state_floats >= 0 and fp.paper_floats >= 0
    assert (fp.state_floats == 0) == (memory == "none")


def test_paper_shape_footprints():
    """Table 1 at the paper's LM shape: the formulas give the paper's memory sizes."""
    cfg = FLAVOURS["lm_paper"]
    assert memory_class("linear").footprint(cfg, {}, 32768).paper_floats == 1_585_152
    assert memory_class("txl").footprint(cfg, {"mem_len": 2048}, 32768).paper_floats == 50_331_648
    if "memorizing" in MEMORIES:
        fp = memory_class("memorizing").footprint(cfg, {"mem_len": 2048, "knn_size": 65000}, 32768)
        assert fp.paper_floats == 183_451_648
    if "rmt" in MEMORIES:
        assert memory_class("rmt").footprint(cfg, {"num_mem_tokens": 100}, 32768).paper_floats == 2_457_600


def test_the_empty_read_convention_changes_only_what_an_empty_memory_gives():
    """Same weights: the two conventions differ in the first segment of the first layer and nowhere before it;
    none is not a convention of its own (no gate); a bad value is named."""
    ids = tokens(3 * N)
    zero, local = tiny("linear"), tiny("linear", empty_read="local")
    local.load_state_dict(zero.state_dict())
    with torch.no_grad():
        a, b = zero(ids).logits, local(ids).logits
    assert (a[:, :N] - b[:, :N]).abs().max() > 1e-3
    from infini_bench.errors import ConfigError
    with pytest.raises(ConfigError, match="memory.empty_read"):
        tiny("delta", empty_read="none")


@pytest.mark.parametrize("key,bad", [("read_norm", "layer"), ("products", "bf16"), ("backprop", "truncated")])
def test_a_bad_ablation_option_is_named_with_its_values(key, bad):
    from infini_bench.errors import ConfigError
    with pytest.raises(ConfigError, match=rf"memory.{key}: .*{bad}.*"):
        tiny("linear", **{key: bad})


def test_the_normalized_read_adds_one_scale_per_head_and_channel_without_weight_decay():
    from infini_bench.train import TrainConfig, param_groups
    plain, normed = tiny("linear"), tiny("linear", read_norm="rms")
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in (plain, normed)]
    extra = shapes[1].items() - shapes[0].items()
    cfg = normed.cfg
    assert sorted(extra) == [(f"layers.{i}.attn.memory.read_scale", (cfg.n_heads * cfg.head_dim,)) for i in range(2)]
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(normed, TrainConfig())}
    assert all(id(normed.layers[i].attn.memory.read_scale) in groups["no_decay"] for i in range(2))


def test_unknown_memory_argument_is_named():
    with pytest.raises(ValueError, match="memory.knn: is not a parameter of memory=txl; accepted: cache, mem_len"):
        build_model("tiny", memory="txl", memory_args={"knn": 3})


# ---- Transformer-XL ------------------------------------------------------------------------------------------
def _rope(x: torch.Tensor, pos: torch.Tensor, model) -> torch.Tensor:
    ang = pos.double()[:, None] * model.rotary.inv_freq.double()[None, :]
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.double().chunk(2, -1)
    return x.double() * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def _band_forward(model, ids: torch.Tensor, mem_len: int) -> torch.Tensor:
    """The same model with every layer's attention replaced by one float64 attention over the whole sequence:
    global RoPE, key j visible to query i when j <= i and j >= (start of i's segment) - mem_len."""
    t = ids.shape[1]
    pos = torch.arange(t)
    seg_start = pos // N * N
    allow = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= seg_start[:, None] - mem_len)

    def attend(q, k, v, gate, state, rotary, kv_detached=None):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = _rope(q, pos, model) @ _rope(k, pos, model).transpose(-1, -2) / q.shape[-1] ** 0.5
        return (s.masked_fill(~allow, float("-inf")).softmax(-1) @ v.double()).to(q.dtype), None

    originals = [layer.attn.memory.forward for layer in model.layers]
    try:
        for layer in model.layers:
            layer.attn.memory.forward = attend
        with torch.no_grad():
            return model(ids).logits
    finally:
        for layer, f in zip(model.layers, originals):
            layer.attn.memory.forward = f


@pytest.mark.parametrize("length", [5 * N, 4 * N + 3, 5])  # whole segments, a partial last one, less than one
@pytest.mark.parametrize("mem_len", [N, 5, 2 * N + 3])
def test_txl_equals_band_mask_forward(mem_len, length):
    model, ids = tiny("txl", mem_len=mem_len), tokens(length)
    ref = _band_forward(model, ids, mem_len)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.stream(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_txl_two_segments_equal_full_attention_and_zero_cache_equals_none():
    ids = tokens(2 * N)
    txl, full, none = tiny("txl"), tiny("full"), tiny("none")
    with torch.no_grad():
        torch.testing.assert_close(txl(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiny("txl", mem_len=0)(tokens(5 * N)).logits, none(tokens(5 * N)).logits)


def test_full_equals_one_segment_as_long_as_the_sequence():
    ids = tokens(5 * N)
    full = tiny("full")
    local = build_model("tiny", memory="none", segment_len=5 * N, n_layers=2).eval()
    local.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, local(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [2 * N, 2 * N - 3])  # segment 1 whole, or partial
@pytest.mark.parametrize("cache", ["input", "kv"])
def test_txl_gradients_stop_at_the_cache(cache, length):
    """Segment 1's loss reaches no input of segment 0 (the cache is detached), but with the paper's input
    cache it reaches W_k through the cached rows; with a kv cache it does not."""
    model = tiny("txl", cache=cache).train()
    emb = {}

    def keep(module, inputs, out):
        out.retain_grad()
        emb["x"] = out

    model.embed.register_forward_hook(keep)
    model(tokens(length)).logits[:, N:].sum().backward()
    assert emb["x"].grad[:, :N].abs().max() == 0 and emb["x"].grad[:, N:].abs().max() > 0
    full = tiny("full").train()
    full(tokens(length)).logits[:, N:].sum().backward()
    # The last layer: there full attention's segment-0 keys have the same values as the cached rows.
    reference = full.layers[-1].attn.wk.weight.grad
    wk = model.layers[-1].attn.wk.weight.grad
    if cache == "input":  # same forward, and W_k sees the cached rows exactly as full attention's keys
        torch.testing.assert_close(wk, reference, rtol=1e-4, atol=1e-6)
    else:
        assert not torch.allclose(wk, reference, rtol=1e-3, atol=1e-6)

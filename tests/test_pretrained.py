"""The Hugging Face loader: with the memory path off, our logits equal transformers' on the same weights."""
import json
from dataclasses import replace

import pytest
import torch

from infini_bench.errors import ConfigError
from infini_bench.memories import memory_names
from infini_bench.model_config import FLAVOURS
from infini_bench.pretrained import config_from_hf, load_pretrained

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["The grass is green. The sky is blue. The sun is yellow.", "There and back again.",
         "What is the pass key? The pass key is 9054.", "Infini-attention keeps a compressive memory."]
VOCAB = 320  # the tokenizer's 256 bytes + merges + specials fit below this


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def save_tokenizer(path):
    """A tiny byte-level BPE trained here, saved the way hub checkpoints ship theirs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def save_hf_model(path, kind="llama", shard=False, **kw):
    """A tiny random HF causal LM, saved with its tokenizer; returns it in eval mode."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, attn_implementation="eager")
    torch.manual_seed(0)
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[kind]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**common, **kw}))
    with torch.no_grad():  # random norms and biases, so a swapped or skipped weight shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="40KB" if shard else "2GB", safe_serialization=True)
    save_tokenizer(path)
    return model.eval()


def ids(t=48, seed=1):
    return torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def hf_segmentwise(model, x, n):
    """HF run on each segment alone: positions restart at 0 and nothing crosses a segment boundary."""
    return torch.cat([hf_logits(model, x[:, i: i + n]) for i in range(0, x.shape[1], n)], dim=1)


def ours(path, x, **kw):
    model, _ = load_pretrained(str(path), **kw)
    with torch.no_grad():
        return model.eval()(x).logits, model


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    return path, save_hf_model(path, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                               shard=True)


def test_gqa_llama3_rope_sharded_equals_transformers(llama_gqa):
    path, hf = llama_gqa
    assert (path / "model.safetensors.index.json").is_file()  # the sharded layout is what gets read
    x = ids()
    logits, model = ours(path, x, segment_len=64, memory="none")
    assert model.cfg.n_kv_heads == 2 and model.cfg.rope_scaling["rope_type"] == "llama3"
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())  # trainable, nothing left on meta
    assert not model.rotary.inv_freq.is_meta
    torch.testing.assert_close(logits, hf_logits(hf, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["none", "linear", "delta"])
def test_closed_gates_equal_transformers_per_segment(llama_gqa, rule):
    """Segments shorter than the input: with the gates shut, each segment is HF on that segment alone."""
    path, hf = llama_gqa
    x = ids()
    logits, _ = ours(path, x, segment_len=16, memory=rule, gate_init=-40.0)  # sigmoid(-40) ~ 4e-18
    expected = hf_segmentwise(hf, x, 16)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (expected - hf_logits(hf, x))[:, 16:].abs().max() > 1e-2  # and that differs from full attention


def test_open_gates_differ(llama_gqa):
    """The memory path is live once the gates open: the comparison above is not vacuous."""
    path, hf = llama_gqa
    x = ids()
    logits, _ = ours(path, x, segment_len=16, memory="linear", gate_init=0.0)
    assert (logits - hf_segmentwise(hf, x, 16))[:, 16:].abs().max() > 1e-3


def test_tied_embeddings_equal_transformers(tmp_path):
    hf = save_hf_model(tmp_path, tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    x = ids()
    logits, model = ours(tmp_path, x, segment_len=48, memory="none")
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(logits, hf_logits(hf, x), rtol=1e-4, atol=1e-4)


def test_qwen2_qkv_bias_equals_transformers(tmp_path):
    hf = save_hf_model(tmp_path, kind="qwen2", num_key_value_heads=2, tie_word_embeddings=True)
    x = ids()
    logits, model = ours(tmp_path, x, segment_len=64, memory="none")
    assert model.cfg.qkv_bias and model.layers[0].attn.wq.bias is not None
    torch.testing.assert_close(logits, hf_logits(hf, x), rtol=1e-4, atol=1e-4)


def test_mistral_sliding_window_equals_transformers(tmp_path):
    """A window at least one segment long never masks anything inside a segment."""
    hf = save_hf_model(tmp_path, kind="mistral", num_key_value_heads=1, sliding_window=32)
    x = ids()
    logits, _ = ours(tmp_path, x, segment_len=16, memory="linear", gate_init=-40.0)
    torch.testing.assert_close(logits, hf_segmentwise(hf, x, 16), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="sliding_window=32 is shorter than model.segment_len=64"):
        load_pretrained(str(tmp_path), segment_len=64, memory="linear")


def test_bf16_load_close_to_fp32(llama_gqa):
    path, hf = llama_gqa
    x = ids()
    model, _ = load_pretrained(str(path), segment_len=64, memory="none", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(x).logits.float()
    torch.testing.assert_close(logits, hf_logits(hf, x), rtol=0.1, atol=0.1)


def test_tokenizer_round_trip(llama_gqa):
    path, _ = llama_gqa
    _, tok = load_pretrained(str(path), segment_len=64, memory="none")
    reference = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS + ["unseen wörds, 12345 and ümlauts!"]:
        encoded = tok.encode(text)
        assert encoded == reference.encode(text, add_special_tokens=False)
        assert tok.decode(encoded) == text
    assert tok.eos_id == reference.convert_tokens_to_ids("</s>")
    texts = TEXTS + ["unseen wörds, 12345 and ümlauts!"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]  # the batched path TokenStream uses


LLAMA_3_2_1B = {  # the published config.json of Llama-3.2-1B (transformers 4.45 layout)
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_config_matches_1b_flavour_in_both_layouts():
    cfg = config_from_hf(LLAMA_3_2_1B, segment_len=2048, memory="linear")
    assert cfg == replace(FLAVOURS["1b"], segment_len=2048, memory="linear")
    v5 = {k: v for k, v in LLAMA_3_2_1B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA_3_2_1B["rope_scaling"], "rope_theta": 500000.0}
    assert config_from_hf(v5, segment_len=2048, memory="linear") == cfg


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (accepted: llama, mistral, qwen2)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_name_the_key(change, words):
    with pytest.raises(ConfigError, match="model.pretrained") as err:
        config_from_hf({**LLAMA_3_2_1B, **change}, segment_len=2048, memory="linear")
    assert words in str(err.value)


def test_unsupported_architecture_on_disk(tmp_path):
    save_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(ConfigError, match="model.pretrained: model_type 'gemma' is not supported"):
        load_pretrained(str(tmp_path), segment_len=64, memory="linear")


@pytest.mark.parametrize("name", ["/nonexistent/checkpoint", "infini-bench-tests/no-such-model"])
def test_unreachable_checkpoint_is_one_line(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network, even where there is one
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        load_pretrained(name, segment_len=64, memory="linear")
    message = str(err.value)
    assert message.startswith(f"model.pretrained: {name!r} could not be loaded: ")
    assert "\n" not in message
    assert err.value.__context__ is None or err.value.__suppress_context__  # no chained hub traceback


# The published config.json of each small open checkpoint that has a flavour.
SMALL_CHECKPOINTS = {
    "smollm2_135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000, "rope_scaling": None,
                     "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False},
    "smollm2_360m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560,
                     "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                     "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000, "rope_scaling": None,
                     "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False},
    "qwen2_5_0_5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
                     "use_sliding_window": False, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("flavour", sorted(SMALL_CHECKPOINTS))
def test_small_checkpoint_configs_match_their_flavours(flavour):
    cfg = config_from_hf(SMALL_CHECKPOINTS[flavour], segment_len=2048, memory="linear")
    assert cfg == replace(FLAVOURS[flavour], memory="linear")


@pytest.mark.parametrize("flavour", sorted(SMALL_CHECKPOINTS))
def test_small_checkpoint_shapes_shrunk_equal_transformers(flavour, tmp_path):
    """The flavour's architecture (head counts, GQA ratio, qkv bias, tied embeddings, rope theta), shrunk in
    width and depth, loaded by us and run by transformers: the same logits with the memory off."""
    hf = SMALL_CHECKPOINTS[flavour]
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    model = save_hf_model(tmp_path, kind=hf["model_type"], hidden_size=4 * heads, num_attention_heads=heads,
                          num_key_value_heads=kv, rope_theta=float(hf["rope_theta"]),
                          tie_word_embeddings=hf["tie_word_embeddings"], rms_norm_eps=hf["rms_norm_eps"])
    x = ids()
    logits, ours_model = ours(tmp_path, x, segment_len=48, memory="none")
    assert (ours_model.cfg.n_heads, ours_model.cfg.n_kv_heads) == (heads, kv)
    assert ours_model.cfg.qkv_bias == FLAVOURS[flavour].qkv_bias
    torch.testing.assert_close(logits, hf_logits(model, x), rtol=1e-4, atol=1e-4)


# Each memory at the setting where it adds nothing across segments: then the converted checkpoint is the
# Hugging Face model on each segment alone. Full attention: the Hugging Face model on the whole input.
# Memorizing Transformers has no such setting: its kNN layer's local attention uses L2-normalised queries and
# keys with a learned scale and, by default, no RoPE, so a converted checkpoint changes at that layer.
NEUTRAL = {"none": {}, "linear": {"gate_init": -40.0}, "delta": {"gate_init": -40.0},
           "txl": {"memory_args": {"mem_len": 0}}, "rmt": {"memory_args": {"num_mem_tokens": 0}},
           "memorizing": None, "full": {}}


@pytest.mark.parametrize("memory", memory_names())
def test_every_memory_converts_from_a_checkpoint(llama_gqa, memory):
    """A pretrained checkpoint loads under every memory: only the memory's own parameters are new (initialised,
    trainable), and at its neutral setting the model equals transformers."""
    path, hf = llama_gqa
    x = ids()
    logits, model = ours(path, x, segment_len=16, memory=memory, **(NEUTRAL[memory] or {}))
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(logits).all()
    if NEUTRAL[memory] is None:
        return
    expected = hf_logits(hf, x) if memory == "full" else hf_segmentwise(hf, x, 16)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    if memory != "none":  # at its default setting the memory's parameters exist or its context changes the output
        converted, _ = load_pretrained(str(path), segment_len=16, memory=memory)
        with torch.no_grad():
            assert memory == "full" or (converted.eval()(x).logits - expected)[:, 16:].abs().max() > 1e-3


def test_a_tokenizers_fingerprint_follows_its_definition(tmp_path):
    """The key of cached tokens: two saves of one tokenizer agree; one id moved, and it changes."""
    from infini_bench.tokenizer import HFTokenizer

    for name in "ab":
        save_tokenizer(tmp_path / name)
    first, same = HFTokenizer(str(tmp_path / "a")), HFTokenizer(str(tmp_path / "b"))
    assert first.fingerprint() == same.fingerprint() != "byte"
    spec = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    x, y = sorted(vocab)[:2]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(spec))
    assert HFTokenizer(str(tmp_path / "b")).fingerprint() != first.fingerprint()

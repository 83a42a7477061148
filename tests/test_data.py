"""Training data: document filtering, windows inside one document, the weighted mixture, offline fallback."""
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

import infini_bench.data as data
from infini_bench.data import Document, MixtureStream, TokenStream
from infini_bench.errors import ConfigError
from infini_bench.tokenizer import ByteTokenizer
from tasks import lm

TOK = ByteTokenizer()


def lettered(letter: str, n: int) -> Document:
    return Document(letter, letter * n)


def test_packed_windows_are_slices_of_the_concatenation():
    docs = [lettered("a", 30), lettered("b", 40)]
    stream = TokenStream(docs, TOK, seq_len=16, batch_size=64, seed=3)
    text = torch.tensor(TOK.encode("a" * 30) + [TOK.eos_id] + TOK.encode("b" * 40) + [TOK.eos_id])
    crossed = 0
    for row in stream(0)["input_ids"]:
        starts = [s for s in range(len(text) - 16) if torch.equal(text[s: s + 16], row)]
        assert starts, "a window that is not a slice of the packed text"
        crossed += int(len(set(row.tolist())) > 1)
    assert crossed > 0  # packing: some windows span the boundary between the two documents


def test_min_doc_tokens_drops_short_documents_and_windows_stay_inside_one():
    docs = [lettered("a", 30), lettered("b", 40), lettered("c", 10)]
    stream = TokenStream(docs, TOK, seq_len=16, batch_size=4000, seed=0, min_doc_tokens=20)
    assert (stream.n_docs, stream.n_dropped) == (2, 1)
    w = stream(0)["input_ids"]
    assert all(len(set(row.tolist())) == 1 for row in w)  # never across a boundary
    letters = Counter(chr(int(row[0])) for row in w)
    assert set(letters) == {"a", "b"}
    # Every valid start equally likely: 30 - 16 = 14 starts in "a", 40 - 16 = 24 in "b".
    assert letters["a"] / len(w) == pytest.approx(14 / 38, abs=0.03)


def test_every_start_of_a_document_is_reachable_and_none_past_its_end():
    doc = Document("d", "".join(chr(ord("A") + i) for i in range(26)))
    stream = TokenStream([doc], TOK, seq_len=8, batch_size=2000, seed=1, min_doc_tokens=1)
    firsts = {int(row[0]) for row in stream(0)["input_ids"]}
    assert firsts == {ord("A") + i for i in range(26 - 8)}  # window of 9 tokens: starts 0..17


def test_min_doc_tokens_that_drops_everything_names_the_key():
    with pytest.raises(ConfigError, match="task.min_doc_tokens"):
        TokenStream([lettered("a", 30)], TOK, seq_len=16, batch_size=2, seed=0, min_doc_tokens=100)


def test_mixture_follows_its_weights_and_each_row_comes_from_its_source():
    streams = {name: TokenStream([lettered(name, 50)], TOK, 8, 1, seed=0, min_doc_tokens=1) for name in "xy"}
    mix = MixtureStream(streams, {"x": 3.0, "y": 1.0}, batch_size=400, seed=5)
    counts = Counter()
    for i in range(10):
        batch, sources = mix(i), mix.sources(i)
        for row, source in zip(batch["input_ids"], sources):
            assert set(row.tolist()) == {ord(source)}
        counts.update(sources)
    assert counts["x"] / 4000 == pytest.approx(0.75, abs=0.03)  # 4 sd of a binomial(4000, 0.75)
    again = MixtureStream(streams, {"x": 3.0, "y": 1.0}, batch_size=400, seed=5)
    assert torch.equal(mix(7)["input_ids"], again(7)["input_ids"])  # a resumed run sees the same batches
    assert torch.equal(mix(7)["input_ids"][:, 1:], mix(7)["labels"][:, :-1])


def lm_task(**task):
    return OmegaConf.create({"dataset": "pg19", "mix": None, "min_doc_tokens": 0, "fallback_offline": True,
                             "seq_len": 64, "max_train_docs": 5, **task})


def offline(name, split, max_docs, min_bytes=0):
    raise ConfigError("task.dataset", f"{name!r} is unavailable (offline)")


def test_offline_mix_falls_back_and_leaves_c4_out(monkeypatch):
    monkeypatch.setattr(data, "hub_documents", offline)
    t = lm_task(mix={"pg19": 2, "arxiv_math": 1, "c4": 1}, min_doc_tokens=4096)
    stream, sources = lm.training_stream(t, lm._mixture(t), 4096, TOK, batch_size=8, seed=0)
    assert sources == {"pg19": "embedded_pg19", "arxiv_math": "embedded_math", "c4": None}
    assert sorted(stream.streams) == ["embedded_math", "embedded_pg19"]
    assert stream.probs.tolist() == pytest.approx([1 / 3, 2 / 3])  # C4's share is spread over the others
    assert stream(0)["input_ids"].shape == (8, 64)
    with pytest.raises(ConfigError, match="task.dataset"):  # without the fallback, offline is an error
        strict = lm_task(mix={"pg19": 1}, fallback_offline=False)
        lm.training_stream(strict, lm._mixture(strict), 0, TOK, 8, 0)
    with pytest.raises(ConfigError, match="task.mix: none of c4 could be reached"):
        only_c4 = lm_task(mix={"c4": 1})
        lm.training_stream(only_c4, lm._mixture(only_c4), 0, TOK, 8, 0)


def test_hub_mix_filters_short_documents(monkeypatch):
    hub = {"pg19": [lettered("p", 500), lettered("q", 50)], "c4": [lettered("c", 30), lettered("w", 300)]}
    seen = {}

    def fake(name, split, max_docs, min_bytes=0):
        seen[name] = min_bytes
        return tuple(hub[name][:max_docs])

    monkeypatch.setattr(data, "hub_documents", fake)
    t = lm_task(mix={"pg19": 1, "c4": 1}, min_doc_tokens=100)
    stream, sources = lm.training_stream(t, lm._mixture(t), 100, TOK, batch_size=64, seed=0)
    assert sources == {"pg19": "pg19", "c4": "c4"} and seen == {"pg19": 100, "c4": 100}
    assert {name: s.n_docs for name, s in stream.streams.items()} == {"c4": 1, "pg19": 1}
    assert {chr(int(row[0])) for row in stream(0)["input_ids"]} == {"p", "w"}


@pytest.mark.parametrize("mix, message", [
    ({"pg19": 0}, "task.mix.pg19: 0 must be a number > 0"),
    ({"wiki": 1}, "task.mix: 'wiki' is not one of"),
    ({}, "task.mix: {} must map data sets to weights"),
])
def test_bad_mix_names_the_key(mix, message):
    with pytest.raises(ConfigError) as err:
        lm._mixture(lm_task(mix=mix))
    assert message in str(err.value)


def test_token_cache_is_reused_on_resume_and_rebuilt_when_fresh(tmp_path, monkeypatch):
    cache = tmp_path / "train_tokens.pt"
    t = lm_task(dataset="embedded_math", mix={"embedded_math": 1, "embedded_pg19": 1}, seq_len=32)
    first, sources = lm.prepared_stream(t, lm._mixture(t), 0, TOK, 4, 0, cache, fresh=False)
    assert cache.exists() and sources == {"embedded_math": "embedded_math", "embedded_pg19": "embedded_pg19"}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although the cache is current")

    monkeypatch.setattr(lm, "training_stream", no_rebuild)
    again, again_sources = lm.prepared_stream(t, lm._mixture(t), 0, TOK, 4, 0, cache, fresh=False)
    assert again_sources == sources
    for i in range(3):
        assert torch.equal(again(i)["input_ids"], first(i)["input_ids"])
    with pytest.raises(AssertionError, match="rebuilt"):  # trainer.resume=false starts over
        lm.prepared_stream(t, lm._mixture(t), 0, TOK, 4, 0, cache, fresh=True)
    with pytest.raises(AssertionError, match="rebuilt"):  # a different recipe doesn't reuse it
        lm.prepared_stream(t, lm._mixture(t), 0, TOK, 4, 0, cache.parent / "other.pt", fresh=False)
    longer = lm_task(dataset="embedded_math", mix={"embedded_math": 1, "embedded_pg19": 1}, seq_len=64)
    with pytest.raises(AssertionError, match="rebuilt"):
        lm.prepared_stream(longer, lm._mixture(longer), 0, TOK, 4, 0, cache, fresh=False)

"""Training data: document filtering, windows inside one document, the weighted mixture, offline fallback."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import infini_bench.data as data
from infini_bench.data import Document, MixtureStream, TokenStream
from infini_bench.errors import ConfigError
from infini_bench.token_cache import TokenCache, state_digest
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


def prepared(t, tmp_path, run="run", fresh=False, batch_size=8, seed=0):
    """The LM task's training stream for task `t`, with the token cache in tmp_path/cache and the run's record
    in tmp_path/<run>."""
    return lm.prepared_stream(t, lm._mixture(t), t.min_doc_tokens, TOK, batch_size, seed, TokenCache(tmp_path / "cache"),
                              tmp_path / run / "train_tokens.json", fresh=fresh)


def test_offline_mix_falls_back_and_leaves_c4_out(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "hub_documents", offline)
    t = lm_task(mix={"pg19": 2, "arxiv_math": 1, "c4": 1}, min_doc_tokens=4096)
    stream, sources = prepared(t, tmp_path)
    assert sources == {"pg19": "embedded_pg19", "arxiv_math": "embedded_math", "c4": None}
    assert sorted(stream.streams) == ["embedded_math", "embedded_pg19"]
    assert stream.probs.tolist() == pytest.approx([1 / 3, 2 / 3])  # C4's share is spread over the others
    assert stream(0)["input_ids"].shape == (8, 64)
    with pytest.raises(ConfigError, match="task.dataset"):  # without the fallback, offline is an error
        prepared(lm_task(mix={"pg19": 1}, fallback_offline=False), tmp_path, run="strict")
    with pytest.raises(ConfigError, match="task.mix: none of c4 could be reached"):
        prepared(lm_task(mix={"c4": 1}), tmp_path, run="only_c4")


def test_hub_mix_filters_short_documents(monkeypatch, tmp_path):
    hub = {"pg19": [lettered("p", 500), lettered("q", 50)], "c4": [lettered("c", 30), lettered("w", 300)]}
    seen = {}

    def fake(name, split, max_docs, min_bytes=0):
        seen[name] = min_bytes
        return tuple(hub[name][:max_docs])

    monkeypatch.setattr(data, "hub_documents", fake)
    t = lm_task(mix={"pg19": 1, "c4": 1}, min_doc_tokens=100)
    stream, sources = prepared(t, tmp_path, batch_size=64)
    assert sources == {"pg19": "pg19", "c4": "c4"} and seen == {"pg19": 100, "c4": 100}
    assert {name: s.n_docs for name, s in stream.streams.items()} == {"c4": 1, "pg19": 1}
    assert {chr(int(row[0])) for row in stream(0)["input_ids"]} == {"p", "w"}
    seen.clear()  # a second run reads what the first streamed and tokenized: the hub is not asked again
    again, _ = prepared(t, tmp_path, run="second", batch_size=64)
    assert seen == {} and torch.equal(again(0)["input_ids"], stream(0)["input_ids"])


@pytest.mark.parametrize("mix, message", [
    ({"pg19": 0}, "task.mix.pg19: 0 must be a number > 0"),
    ({"wiki": 1}, "task.mix: 'wiki' is not one of"),
    ({}, "task.mix: {} must map data sets to weights"),
])
def test_bad_mix_names_the_key(mix, message):
    with pytest.raises(ConfigError) as err:
        lm._mixture(lm_task(mix=mix))
    assert message in str(err.value)


def test_runs_share_one_token_cache_entry_per_data_set_and_tokenizer(tmp_path, monkeypatch):
    t = lm_task(dataset="embedded_math", mix={"embedded_math": 1, "embedded_pg19": 1}, seq_len=32)
    first, sources = prepared(t, tmp_path, run="a")
    assert sources == {"embedded_math": "embedded_math", "embedded_pg19": "embedded_pg19"}
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2 and [e.split("-")[0] for e in entries] == ["embedded_math", "embedded_pg19"]
    record = json.loads((tmp_path / "a" / "train_tokens.json").read_text())
    assert {s: Path(pin["file"]).name for s, pin in record["streams"].items()} == dict(zip(sources, entries))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the token cache holds the tokens")

    monkeypatch.setattr(lm, "_tokenize", no_tokenizing)
    for run, fresh in (("a", False), ("a", True), ("b", False)):  # a resume, trainer.resume=false, another run
        again, again_sources = prepared(t, tmp_path, run=run, fresh=fresh)
        assert again_sources == sources
        for i in range(3):
            assert torch.equal(again(i)["input_ids"], first(i)["input_ids"])
    longer = lm_task(dataset="embedded_math", mix={"embedded_math": 1, "embedded_pg19": 1}, seq_len=64)
    prepared(longer, tmp_path, run="c")  # packed documents: the window length does not change the tokens
    with pytest.raises(AssertionError, match="tokenized although"):  # kept whole: the shortest kept depends on it
        prepared(lm_task(dataset="embedded_math", mix={"embedded_math": 1}, seq_len=64, min_doc_tokens=5000),
                 tmp_path, run="d")
    monkeypatch.setattr(TOK, "fingerprint", lambda: "another byte tokenizer")
    with pytest.raises(AssertionError, match="tokenized although"):  # another tokenizer, other tokens
        prepared(t, tmp_path, run="e")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_corrupt_cache_entry_is_made_again_and_the_run_trains_on_the_same_tokens(tmp_path, caplog):
    t = lm_task(dataset="embedded_math", seq_len=32)
    first, _ = prepared(t, tmp_path)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a torn file
    again, _ = prepared(t, tmp_path)  # the resume
    assert "is not used (it is unreadable" in caplog.text
    assert torch.equal(again(5)["input_ids"], first(5)["input_ids"])
    stored = torch.load(entry, weights_only=True)
    stored["state"]["tokens"][7] += 1  # a flipped token: the file reads, its checksum does not match
    torch.save(stored, entry)
    caplog.clear()
    again, _ = prepared(t, tmp_path, run="other")
    assert "is not used (its tokens do not match their SHA-256)" in caplog.text
    assert torch.equal(again(5)["input_ids"], first(5)["input_ids"])


def test_a_resume_whose_tokens_can_not_be_made_again_stops_in_one_line(tmp_path, monkeypatch):
    """The cache was cleared, and the documents changed since: the run does not go on with other tokens."""
    t = lm_task(dataset="embedded_math", seq_len=32)
    prepared(t, tmp_path)
    for entry in (tmp_path / "cache").iterdir():
        entry.unlink()
    prepared(t, tmp_path)  # the same documents: tokenized again, the same SHA-256, the run goes on
    for entry in (tmp_path / "cache").iterdir():
        entry.unlink()
    edited = (Document("hardy", data.embedded_documents("embedded_math", "train")[0].text + " and more"),)
    monkeypatch.setattr(lm, "load_documents", lambda *args, **kwargs: edited)
    with pytest.raises(ConfigError, match=r"^trainer\.resume: the training tokens of embedded_math are not in the "
                                          r"token cache, and tokenized again they differ .*trainer\.resume=false"):
        prepared(t, tmp_path)
    prepared(t, tmp_path, fresh=True)  # starting over takes the documents as they are now


def test_cache_entries_written_at_once_by_several_writers_stay_whole(tmp_path):
    import threading

    cache = TokenCache(tmp_path)
    state = TokenStream(data.embedded_documents("embedded_math", "train"), TOK, 32, 1, 0).state()
    key = {"dataset": "embedded_math", "test": 1}
    errors = []

    def write():
        try:
            for _ in range(5):
                cache.save(key, state)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    writers = [threading.Thread(target=write) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors and [p.name for p in tmp_path.iterdir()] == [cache.path(key).name]  # no temporary file left
    assert cache.load(key).sha256 == state_digest(state)
    assert cache.load({**key, "test": 2}) is None


def test_windows_start_at_document_starts_when_asked():
    """window_start=document: every window is a document's first seq_len + 1 tokens, each document as likely;
    the default starts anywhere; packed text has no document starts, so asking for them is one clear error."""
    docs = [Document("a", "".join(chr(ord("A") + i) for i in range(30))), Document("b", "b" * 40)]
    starts = TokenStream(docs, TOK, seq_len=8, batch_size=2000, seed=0, min_doc_tokens=1, window_start="document")
    firsts = Counter(int(row[0]) for row in starts(0)["input_ids"])
    assert set(firsts) == {ord("A"), ord("b")} and firsts[ord("A")] / 2000 == pytest.approx(0.5, abs=0.05)
    assert all(row.tolist() == TOK.encode("ABCDEFGH") for row in starts(0)["input_ids"] if row[0] == ord("A"))
    anywhere = TokenStream(docs, TOK, seq_len=8, batch_size=2000, seed=0, min_doc_tokens=1)
    assert len({int(row[0]) for row in anywhere(0)["input_ids"]}) > 2
    restored = TokenStream.from_state(starts.state(), 8, 2000, 0, window_start="document")
    assert torch.equal(restored(5)["input_ids"], starts(5)["input_ids"])  # a resumed run draws the same windows
    with pytest.raises(ConfigError, match=r"^task\.window_start: document needs task\.min_doc_tokens > 0"):
        TokenStream(docs, TOK, seq_len=8, batch_size=2, seed=0, window_start="document")
    with pytest.raises(ConfigError, match=r"^task\.window_start: 'start' is not one of any, document"):
        TokenStream(docs, TOK, seq_len=8, batch_size=2, seed=0, min_doc_tokens=1, window_start="start")


def test_tokenizing_writes_no_progress_bar_into_a_pipe_or_log(capsys):
    """A slow tokenizer shows a bar on a terminal only: a bad input's one-line error must stay one line."""
    import time

    class Slow(ByteTokenizer):
        def encode_batch(self, texts):
            time.sleep(2.3)  # past the bar's 2 s delay
            return super().encode_batch(texts)

    TokenStream([lettered("x", 200)], Slow(), seq_len=16, batch_size=1, seed=0)
    assert "tokenize" not in capsys.readouterr().err  # pytest's capture is not a terminal

"""The book summarisation task: truncation, synthetic books, loss masking, references, and a tiny end-to-end run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from infini_bench.data import load_documents
from infini_bench.errors import ConfigError
from infini_bench.metrics import rouge
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.tracking import Run
from tasks import booksum
from tasks.booksum import (BatchFn, Book, CutAtRandom, Example, event_spans, events_read, events_recalled, group_by_book, guess,
                           make_batch, oracle, summarise_books, summary_loss, synthetic_books, truncate)
from tasks.runner import run_task

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["task=booksum", "logger=none", *overrides])


def test_truncate_keeps_the_configured_part():
    ids = list(range(10))
    assert truncate(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate(ids, 4, "tail") == [6, 7, 8, 9]
    assert truncate(ids, 5, "head_tail") == [0, 1, 2, 8, 9]
    assert truncate(ids, 12, "tail") == ids  # a short book is used whole
    # run_task truncates once to the longest input, then again per length: that must equal one truncation.
    for mode in ("head", "tail", "head_tail"):
        for n in range(1, 8):
            assert truncate(truncate(ids, 8, mode), n, mode) == truncate(ids, n, mode)


def test_length_labels_are_the_papers():
    from infini_bench.paper import length_label

    lengths = (16384, 131072, 500000, 1048576, 2 * 1048576, 3000, 2048, 256, 1536)
    assert [length_label(n) for n in lengths] == ["16K", "128K", "500K", "1M", "2M", "3K", "2K", "256", "1536"]


def events_of(book):
    return [e if e.endswith(".") else e + "." for e in book.references[0].split(". ")]


def test_synthetic_books_are_seeded_and_spread_their_events_in_order():
    books = synthetic_books("validation", 3, 3000, 5, seed=7)
    assert books == synthetic_books("validation", 3, 3000, 5, seed=7)
    assert books[0].text != synthetic_books("validation", 1, 3000, 5, seed=8)[0].text
    for book in books:
        events = events_of(book)
        assert len(events) == 5
        paragraphs = book.text.split("\n\n")
        where = [paragraphs.index(e) for e in events]  # every event is a paragraph of its own, in summary order
        assert where == sorted(where)
        for e, event in enumerate(events):  # event e sits in slice e of the book
            at = len("\n\n".join(paragraphs[: where[e]])) / len(book.text)
            assert e / 5 - 0.05 <= at <= (e + 1) / 5 + 0.05
        assert 3000 - 20 <= len(book.text) <= 3000 + sum(len(e) + 4 for e in events)  # filler cut at a word


def test_filler_comes_from_the_split_s_novels():
    held_out = " ".join(load_documents("embedded_pg19", "validation")[0].text.split())
    filler = lambda b: max(b.text.split("\n\n")[1:-1], key=len)  # noqa: E731  (a whole paragraph of filler)
    assert filler(synthetic_books("validation", 1, 2000, 3, seed=0)[0]) in held_out
    assert filler(synthetic_books("train", 1, 2000, 3, seed=0)[0]) not in held_out


def test_batch_puts_the_loss_on_summary_tokens_only():
    tok = ByteTokenizer()
    examples = [Example(torch.tensor(tok.encode("a long book")), torch.tensor(tok.encode("sum"))),
                Example(torch.tensor(tok.encode("bk")), torch.tensor(tok.encode("xy")))]
    batch = make_batch(examples, prefix=[tok.bos_id], prompt=tok.encode("|"), eos_id=tok.eos_id, pad_id=tok.pad_id)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (2, 16)  # BOS + 11 + 1 + 3 + EOS = 17, minus the shift
    assert ids[0].tolist() == [tok.bos_id] + tok.encode("a long book|sum")
    assert labels[0].tolist() == [-100] * 12 + tok.encode("sum") + [tok.eos_id]
    assert ids[1].tolist() == [tok.bos_id] + tok.encode("bk|xy") + [tok.eos_id] + [tok.pad_id] * 9
    assert labels[1].tolist() == [-100] * 3 + tok.encode("xy") + [tok.eos_id] + [-100] * 10


def test_streamed_summary_loss_equals_a_parallel_forward():
    torch.manual_seed(0)
    model, tok = build_model("tiny", segment_len=16).eval(), ByteTokenizer()
    examples = [Example(torch.tensor(tok.encode("a book that spans a few segments of sixteen")),
                        torch.tensor(tok.encode("its summary")))]
    tokens = dict(prefix=[tok.bos_id], prompt=tok.encode("|"), eos_id=tok.eos_id, pad_id=tok.pad_id)
    batch = make_batch(examples, **tokens)
    with torch.no_grad():
        expected = F.cross_entropy(model(batch["input_ids"]).logits[0], batch["labels"][0], ignore_index=-100)
    streamed = summary_loss(model, examples, tokens, torch.device("cpu"), "fp32")
    assert streamed == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("memory", ["linear", "memorizing"])
def test_greedy_summaries_of_equal_length_inputs_are_decoded_as_one_batch_and_equal_one_at_a_time(memory, monkeypatch):
    """Greedy decoding needs no seed, so books of the same input length go through generate together; each summary
    is the one that book gets alone. Books of other lengths (the shortest input here reads one book whole) go alone."""
    from omegaconf import OmegaConf

    from infini_bench.generate import generate

    torch.manual_seed(0)
    model, tok = build_model("tiny", memory=memory, segment_len=16).eval(), ByteTokenizer()
    books = [Book(str(i), "b", text, ("r",)) for i, text in enumerate(
        ["a short book", "the second book is longer than the shortest input", "a third book, also a long one"])]
    tokens = dict(prefix=[tok.bos_id], prompt=tok.encode("|"), eos_id=tok.eos_id, pad_id=tok.pad_id)
    t = OmegaConf.create({"truncate": "head", "max_new_tokens": 20, "temperature": 0.5, "top_p": 0.95,
                          "greedy": True, "seed": 0})
    tcfg = OmegaConf.create({"progress": False, "precision": "fp32"})
    calls = []
    monkeypatch.setattr(booksum, "generate", lambda model, prompt, *a, **k: calls.append(prompt.shape[0])
                        or generate(model, prompt, *a, **k))
    got, used = summarise_books(model, tok, books, [20, 40], tokens, t, torch.device("cpu"), tcfg)
    assert sorted(calls) == [1, 1, 1, 1, 2] and used == {20: [12, 20, 20], 40: [12, 40, 29]}
    for n in (20, 40):
        for i, b in enumerate(books):
            ids = truncate(tok.encode(b.text), n, "head")
            alone = generate(model, torch.tensor([tokens["prefix"] + ids + tokens["prompt"]]), 20, greedy=True,
                             eos_id=tok.eos_id)
            assert got[n][i] == tok.decode(alone.tokens[0]).strip()
    t.greedy = False  # sampling: one book a batch, each with its own seed
    calls.clear()
    summarise_books(model, tok, books, [20], tokens, t, torch.device("cpu"), tcfg)
    assert calls == [1, 1, 1]


def test_batch_fn_is_a_function_of_the_index():
    examples = [Example(torch.tensor([i, i]), torch.tensor([i])) for i in range(50)]
    fn = BatchFn(examples, 4, seed=3, prefix=[256], prompt=[10], eos_id=257, pad_id=258)
    assert torch.equal(fn(5)["input_ids"], fn(5)["input_ids"])
    assert not torch.equal(fn(5)["input_ids"], fn(6)["input_ids"])


def test_books_cut_at_random_are_summarised_by_the_events_inside_the_cut():
    """task.synthetic.train_cut_min: each drawn book is cut at its own length, and its summary lists exactly the
    events whose sentences the cut keeps whole (found here in the decoded text, not from the token spans)."""
    tok = ByteTokenizer()
    books = synthetic_books("train", 6, 900, 4, 7)
    cut = CutAtRandom(books, tok, 60, 1100, "head", 1000)
    tokens = dict(prefix=[tok.bos_id], prompt=tok.encode("|"), eos_id=tok.eos_id, pad_id=tok.pad_id)
    fn = BatchFn(cut, 16, seed=3, cut=cut, **tokens)
    batch = fn(5)
    assert torch.equal(batch["input_ids"], BatchFn(cut, 16, seed=3, cut=cut, **tokens)(5)["input_ids"])  # by index
    lengths, counts = set(), set()
    for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        text = tok.decode(row[1:]).split("|")[0]  # the book part: after BOS, before the prompt
        book = next(b for b in books if b.text.startswith(text))
        summary = tok.decode([x for x in labels if x != -100 and x != tok.eos_id])
        assert summary == " ".join(e for e in book.events if e in text)
        lengths.add(len(text))
        counts.add(len([e for e in book.events if e in text]))
    assert len(lengths) > 8 and 0 in counts and len(counts) >= 3  # cuts differ; some hold no event (EOS alone)
    assert not torch.equal(batch["input_ids"], fn(6)["input_ids"])


def test_a_run_trains_on_cut_books(tmp_path):
    cfg = config("trainer.steps=2", "trainer.batch_size=2", "trainer.progress=false", "task.train_input_len=192",
                 "task.synthetic.train_cut_min=64", "task.eval_books=1", "task.eval_input_lens=[128]",
                 "task.max_new_tokens=4", "task.synthetic.train_books=4", "task.synthetic.book_chars=400")
    results = run_task(cfg, Run(tmp_path, {}, device="cpu"))
    assert results["train/steps"] == 2 and "booksum/events_recalled@128" in results


@pytest.mark.parametrize("override", ["task.synthetic.train_cut_min=0", "task.synthetic.train_cut_min=513"])
def test_a_cut_outside_the_training_length_names_the_key(override, tmp_path):
    with pytest.raises(ConfigError, match="task.synthetic.train_cut_min"):
        run_task(config("trainer.steps=1", override), Run(tmp_path, {}, device="cpu"))


def test_references_are_grouped_per_book_and_scored_by_max():
    rows = [{"bid": 1, "title": "A", "book": "text a", "summary": "the cat sat"},
            {"bid": 2, "title": "B", "book": "text b", "summary": "a dog ran"},
            {"bid": 1, "title": "A", "book": "text a", "summary": "birds flew south"}]
    books = group_by_book(rows)
    assert [(b.bid, b.references) for b in books] == [("1", ("the cat sat", "birds flew south")), ("2", ("a dog ran",))]
    assert rouge(["birds flew south"], [list(books[0].references)])["overall"] == pytest.approx(100.0)


@pytest.mark.parametrize("override, key", [("task.truncate=middle", "task.truncate"),
                                           ("task.eval_input_lens=[]", "task.eval_input_lens"),
                                           ("task.source=booksum", "task.source"),
                                           ("task.top_p=1.5", "task.top_p")])
def test_bad_config_names_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_task(config(override), Run(tmp_path, {}, device="cpu"))
    assert err.value.key == key


def test_tiny_end_to_end(tmp_path, monkeypatch):
    from infini_bench import plots

    drawn, save = {}, plots.save_figure  # the length sweep's lines, the oracle's among them
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.update(
        {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}) or save(fig, path))
    cfg = config("trainer.steps=3", "trainer.batch_size=2", "trainer.eval_every=2", "trainer.progress=false",
                 "task.train_input_len=192", "task.eval_books=2", "task.eval_input_lens=[128,512]",
                 "task.max_new_tokens=12", "task.sample_rows=1", "task.synthetic.train_books=8",
                 "task.synthetic.book_chars=400", "task.synthetic.n_events=2")
    results = run_task(cfg, Run(tmp_path, {}, device="cpu"))
    saved = json.loads((tmp_path / "booksum_predictions.json").read_text())
    refs = [b["references"] for b in saved["books"]]
    for n, label in [(128, "128"), (512, "512")]:  # the reported scores are ROUGE of the saved predictions
        preds = [b["predictions"][str(n)] for b in saved["books"]]
        assert results[f"booksum/overall@{label}"] == pytest.approx(rouge(preds, refs)["overall"])
    assert results["booksum/input_tokens@128"] == 128.0
    assert 400 < results["booksum/input_tokens@512"] <= 512  # short books are used whole
    assert results["booksum/input_len"] == 512
    # The oracle: at 512 every book (about 400 characters + 2 events) is read whole, so the memory oracle is the
    # reference itself; local attention alone sees at most the last event.
    assert results["booksum/oracle_memory/overall@512"] == pytest.approx(100.0)
    assert 0 <= results["booksum/oracle_local/overall@512"] < 100
    assert 0 <= results["booksum/oracle_memory/overall@128"] <= 100
    assert 0 <= results["booksum/events_beyond_window@128"] <= results["booksum/events_beyond_window@512"] <= 1
    assert results["booksum/events_in_input@512"] == 1.0 and 0 <= results["booksum/events_in_input@128"] < 1
    for n in ("128", "512"):  # the events stated word for word, recomputed from the saved predictions
        events = [[e.strip() + "." for e in b["references"][0].split(".") if e.strip()] for b in saved["books"]]
        assert results[f"booksum/events_recalled@{n}"] == pytest.approx(sum(
            events_recalled(b["predictions"][n], e) for b, e in zip(saved["books"], events)) / len(events))
    assert 0 < results["booksum/guess/overall"] < 100
    assert results["booksum/rouge1"] == pytest.approx(saved["length_sweep"][1]["rouge1"])
    table = json.loads((tmp_path / "tables" / "booksum_samples.json").read_text())
    assert len(table["rows"]) == 2 and table["columns"][3] == "prediction"
    assert (tmp_path / "booksum_length_sweep.png").stat().st_size > 0
    assert drawn["oracle: perfect memory"] == [results["booksum/oracle_memory/overall@128"], pytest.approx(100.0)]
    assert drawn["oracle: local attention alone"][1] == results["booksum/oracle_local/overall@512"]


EVENTS = ("Dagny buried the brass bell under the bridge.", "Corvin sold a red lantern in the mill.",
          "Ingrid hid the old map at the chapel.")


def known_book():
    """Events at known byte positions: 100 filler bytes, event 0, 300 filler, event 1, 300 filler, event 2, 60."""
    fill = lambda k: ("x" * (k - 1)) + " "  # noqa: E731
    text = "\n\n".join([fill(100), EVENTS[0], fill(300), EVENTS[1], fill(300), EVENTS[2], fill(60)])
    return Book("k", "known", text, (" ".join(EVENTS),), EVENTS)


def test_events_recalled_counts_only_events_stated_word_for_word():
    events = EVENTS + (EVENTS[0],)  # the first event happens twice
    assert events_recalled(" ".join(events), events) == 1.0
    once = f"{EVENTS[0]} {EVENTS[1]} Ingrid hid the old map at the mill. Corvin sold"  # one place wrong, one cut off
    assert events_recalled(once, events) == pytest.approx(2 / 4)
    assert events_recalled(f"{EVENTS[0]} {EVENTS[0]} {EVENTS[0]}", events) == pytest.approx(2 / 4)  # at most twice
    assert events_recalled("", events) == 0.0


def test_a_guess_from_the_vocabulary_scores_above_zero_and_far_below_the_reference():
    books = synthetic_books("validation", 8, 1800, 4, 1234)
    floor = guess(books, 1234)
    assert floor == guess(books, 1234) and floor != guess(books, 1235)  # seeded
    assert 10 < floor["overall"] < 60 and rouge([b.references[0] for b in books],
                                                [list(b.references) for b in books])["overall"] == pytest.approx(100)


def test_event_spans_are_the_events_token_positions():
    book, tok = known_book(), ByteTokenizer()
    ids = tok.encode(book.text)
    spans = event_spans(tok, book.text, book.events)
    assert [tok.decode(ids[a:b]) for a, b in spans] == list(EVENTS)
    assert spans[0][0] == 102 and spans[1][0] == spans[0][1] + 2 + 300 + 2


def test_memory_oracle_of_a_whole_book_is_the_reference():
    tok, books = ByteTokenizer(), synthetic_books("validation", 3, 1500, 4, seed=5)
    n = max(len(tok.encode(b.text)) for b in books)
    for mode in ("head", "tail", "head_tail"):
        got = oracle(tok, books, [n], mode, window=64)[n]
        assert got["memory"] == pytest.approx(rouge([b.references[0] for b in books], [list(b.references) for b in books]))
        assert got["memory"]["overall"] == pytest.approx(100.0)
        assert got["local"]["overall"] < 100  # one event of four at most sits in the last 64 tokens


def test_local_oracle_counts_only_the_events_in_the_last_segment():
    book, tok = known_book(), ByteTokenizer()
    n_tokens, spans = len(tok.encode(book.text)), event_spans(tok, book.text, book.events)
    e2_start = spans[2][0]
    # head: the input ends just after event 2; a window reaching back to its start holds it, one byte less doesn't.
    n = spans[2][1] + 5
    assert events_read(n_tokens, spans, n, "head", window=n - e2_start) == ([0, 1, 2], [2])
    assert events_read(n_tokens, spans, n, "head", window=n - e2_start - 1) == ([0, 1, 2], [])
    # an event cut by the truncation is not in the input
    assert events_read(n_tokens, spans, spans[1][1] - 1, "head", window=64) == ([0], [])
    # tail: the last 64 tokens of the book hold no event; the last 120 hold event 2 only
    assert events_read(n_tokens, spans, n_tokens, "tail", window=64) == ([0, 1, 2], [])
    assert events_read(n_tokens, spans, 120, "tail", window=120) == ([2], [2])
    # head_tail: 300 tokens = the first 150 (event 0) + the last 150 (event 2); the window is the last 150
    assert events_read(n_tokens, spans, 300, "head_tail", window=150) == ([0, 2], [2])
    # the oracle summary is those events joined as the reference is
    got = oracle(tok, [book], [n], "head", window=n - e2_start)[n]
    assert got["local"] == pytest.approx(rouge([EVENTS[2]], [[book.references[0]]]))


def test_events_beyond_the_window_grow_with_the_input():
    book, tok = known_book(), ByteTokenizer()
    spans = event_spans(tok, book.text, book.events)
    lengths = [spans[0][1], spans[1][1], spans[2][1], spans[2][1] + 70]
    got = oracle(tok, [book], lengths, "head", window=64)
    # each input ends on an event (it is in the window, not beyond it), except the last (64 filler bytes after)
    assert [got[n]["events_beyond_window"] for n in lengths] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert [got[n]["memory"]["overall"] for n in lengths] == sorted(got[n]["memory"]["overall"] for n in lengths)
    assert got[lengths[-1]]["local"]["overall"] == 0.0


# ---- the one-GPU recipe (experiment=booksum_gpu) ---------------------------------------------------------------------


def test_booksum_gpu_reads_whole_books_at_its_longest_input_and_more_events_beyond_the_window_as_it_grows():
    """What conf/experiment/booksum_gpu.yaml promises, checked on its own books before any GPU time is spent."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=booksum_gpu"])
    t, s, tr, n = cfg.task, cfg.task.synthetic, cfg.trainer, cfg.model.segment_len
    lengths = list(t.eval_input_lens)
    assert [x // n for x in lengths] == [4, 16, 32, 64, 128, 256] and all(x % n == 0 for x in lengths)
    assert (t.name, t.source, t.truncate, t.greedy, cfg.model.tokenizer) == ("booksum", "synthetic", "head", True, "byte")
    assert (tr.precision, tr.compile) == ("bf16", False)  # books differ in length: no fixed shape to compile
    tok = ByteTokenizer()
    books = synthetic_books(t.eval_split, t.eval_books, s.book_chars, s.n_events, s.seed)
    train = synthetic_books("train", 16, s.book_chars, s.n_events, s.seed)
    sizes = [len(tok.encode(b.text)) for b in books + train]
    assert lengths[-2] < min(sizes) and max(sizes) <= lengths[-1]  # only the longest input reads a book whole
    assert max(sizes) <= t.train_input_len and t.train_input_len // n >= 4  # fine-tuning: whole books, many segments
    summaries = max(len(tok.encode(b.references[0])) for b in books + train)
    assert summaries <= min(t.summary_max_tokens, t.max_new_tokens)  # every event fits the generated summary
    got = oracle(tok, books, lengths, t.truncate, n)
    beyond = [got[x]["events_beyond_window"] for x in lengths]
    assert beyond == sorted(beyond) and len(set(beyond)) == len(beyond) and beyond[-1] == pytest.approx(1.0)
    assert got[lengths[-1]]["memory"]["overall"] == pytest.approx(100.0)
    assert all(got[x]["local"]["overall"] < got[x]["memory"]["overall"] for x in lengths)
    # docs/BOOKSUM.md's table for the recipe is this oracle
    doc = (ROOT / "docs" / "BOOKSUM.md").read_text().split("## The one-GPU recipe")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in doc.splitlines() if line.startswith("| ")}
    assert rows["memory oracle (overall)"] == [f"{got[x]['memory']['overall']:.1f}" for x in lengths]
    assert rows["local oracle (overall)"] == [f"{got[x]['local']['overall']:.1f}" for x in lengths]
    assert rows["events beyond the window"] == [f"{got[x]['events_beyond_window']:.2f}" for x in lengths]


def test_booksum_gpu_base_sees_each_book_and_its_summary_in_one_segment_with_the_recipe_s_model():
    """The base learns to copy events it can see: book, prompt and summary in one segment, no memory, and the same
    decoder as booksum_gpu, so that every memory of the recipe can start from its weights."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = compose("config", overrides=["experiment=booksum_gpu_base"])
        recipe = compose("config", overrides=["experiment=booksum_gpu"])
    t, s = base.task, base.task.synthetic
    assert base.memory.name == "none" and base.model.arch == recipe.model.arch
    assert base.model.tokenizer == recipe.model.tokenizer == "byte" and base.trainer.time_budget_s
    tok = ByteTokenizer()
    books = synthetic_books("train", 64, s.book_chars, s.n_events, s.seed) + \
        synthetic_books(t.eval_split, t.eval_books, s.book_chars, s.n_events, s.seed)
    prompt = len(tok.encode(t.prompt))
    for b in books:
        book, summary = len(tok.encode(b.text)), len(tok.encode(b.references[0]))
        assert book <= t.train_input_len and summary <= min(t.summary_max_tokens, t.max_new_tokens)
        assert 1 + book + prompt + summary + 1 <= base.model.segment_len  # BOS, book, prompt, summary, EOS
    assert list(t.eval_input_lens) == [t.train_input_len]


def test_booksum_gpu_base_is_the_base_that_was_measured():
    """Every memory of the recipe starts from the seed-1 base measured on one H200 (docs/BOOKSUM.md, "The base"):
    experiment=booksum_gpu_base must still compose to the config that run saved, or make booksum-grid trains
    another base (booksum_gpu's two micro-batches, inherited, once doubled its books a step and halved its steps)."""
    from omegaconf import OmegaConf

    run = ROOT / "docs/bench/booksum-gpu-base-h200-2026-12-04/base/s1/results.json"
    saved = json.loads(run.read_text())["config"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        now = OmegaConf.to_container(compose("config", overrides=saved["hydra"]["overrides"]), resolve=True)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    for section in ("model", "memory", "task", "trainer"):
        a, b = flat(now[section]), flat(saved[section])
        # a key added since, off by default (None), is the run's behaviour too
        assert {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {}, section


def test_booksum_gpu_short_cuts_the_base_s_books_into_segments_and_reads_them_whole_at_its_longest_input():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        short = compose("config", overrides=["experiment=booksum_gpu_short"])
        base = compose("config", overrides=["experiment=booksum_gpu_base"])
    t, n = short.task, short.model.segment_len
    assert t.synthetic == base.task.synthetic and short.model.arch == base.model.arch and n < base.model.segment_len
    lengths = list(t.eval_input_lens)
    assert [x // n for x in lengths] == [2, 4, 8] and t.train_input_len == lengths[-1]
    books = synthetic_books(t.eval_split, t.eval_books, t.synthetic.book_chars, t.synthetic.n_events, t.synthetic.seed)
    got = oracle(ByteTokenizer(), books, lengths, t.truncate, n)
    assert got[lengths[-1]]["events_in_input"] == 1.0 and got[lengths[0]]["events_in_input"] < 1
    beyond = [got[x]["events_beyond_window"] for x in lengths]
    assert beyond == sorted(beyond) and beyond[-1] > 0.5  # most events lie before the last segment


def test_booksum_gpu_runs_end_to_end_shrunk_and_writes_the_oracle(tmp_path):
    out = tmp_path / "run"
    args = ["experiment=booksum_gpu", "model.segment_len=32",
            "model.arch={dim:32,n_layers:1,n_heads:2,n_kv_heads:2,head_dim:16,ffn_dim:64}",
            "task.train_input_len=256", "task.summary_max_tokens=64", "task.eval_input_lens=[64,512]",
            "task.eval_books=1", "task.max_new_tokens=4", "task.synthetic.train_books=4",
            "task.synthetic.book_chars=400", "task.synthetic.n_events=2", "trainer.steps=2", "trainer.batch_size=2",
            "trainer.precision=fp32", "trainer.eval_every=100", "trainer.ckpt_every=100", "trainer.progress=false",
            "logger=none", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())["results"]
    assert r["train/steps"] == 2 and r["booksum/books"] == 1 and r["booksum/input_len"] == 512
    assert {f"booksum/{k}@{x}" for k in ("overall", "oracle_memory/overall", "oracle_local/overall",
                                         "events_beyond_window") for x in (64, 512)} <= set(r)
    assert r["booksum/oracle_memory/overall@512"] == pytest.approx(100.0)  # a book of about 490 bytes, read whole
    assert r["booksum/events_beyond_window@64"] <= r["booksum/events_beyond_window@512"]
    # ROUGE-1, -2 and -L at each length, as the length sweep beside the predictions has them
    sweep = json.loads((out / "booksum_predictions.json").read_text())["length_sweep"]
    assert [[r[f"booksum/{k}@{row['input_len']}"] for k in ("rouge1", "rouge2", "rougeL")] for row in sweep] == \
        [[row[k] for k in ("rouge1", "rouge2", "rougeL")] for row in sweep]
    assert r["booksum/rouge1@512"] == r["booksum/rouge1"]  # the longest input is the run's headline score
    # A run scored before the event counts and ROUGE by length existed gets the same ones from its predictions.
    sys.path.insert(0, str(ROOT / "scripts"))
    from booksum_rescore import rescore

    counted = {k: v for k, v in r.items() if k.startswith(("booksum/events_recalled", "booksum/events_in_input",
                                                           "booksum/guess", "booksum/rouge1@", "booksum/rouge2@",
                                                           "booksum/rougeL@"))}
    assert len(counted) == 11
    saved = json.loads((out / "results.json").read_text())
    saved["results"] = {k: v for k, v in r.items() if k not in counted}
    (out / "results.json").write_text(json.dumps(saved))
    assert set(rescore(out)) == {*counted, "booksum/rescored_from"}
    again = json.loads((out / "results.json").read_text())["results"]
    assert {k: again[k] for k in counted} == pytest.approx(counted)
    assert rescore(out) == {}  # nothing left to add


def test_make_booksum_grid_trains_the_base_then_every_memory_and_seed_from_it(variant_calls):
    bases, grid = variant_calls("booksum-grid")
    for words in (bases, grid):
        assert "HF_HUB_OFFLINE=1" in words and float(words[words.index("--budget") + 1]) >= 200
    assert bases[bases.index("--experiment") + 1] == "booksum_gpu_base"
    assert [bases[i + 1] for i, w in enumerate(bases) if w == "--variant"] == ["s1=seed=1"]
    base = next(bases[i + 1] for i, w in enumerate(bases) if w.endswith("passkey_gpu_variants.py")) + "/s1/model.safetensors"
    assert grid[grid.index("--experiment") + 1] == "booksum_gpu" and int(grid[grid.index("--per-gpu") + 1]) == 7
    variants = [grid[i + 1] for i, w in enumerate(grid) if w == "--variant"]
    memories = sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml"))
    assert variants == [f"{m}-s{s}=memory={m} seed={s} model.init_from={base}"
                        + (" memory.bptt_depth=16" if m == "rmt" else "") for s in (0, 1) for m in memories]
    assert len(memories) == 7  # one seed's runs side by side: each wave of seven is every memory once


def test_make_booksum_short_runs_four_memories_with_two_seeds_from_the_base(variant_calls):
    calls = variant_calls("booksum-short")
    short = calls[-1]
    assert short[short.index("--experiment") + 1] == "booksum_gpu_short"
    variants = [short[i + 1] for i, w in enumerate(short) if w == "--variant"]
    assert [v.split("=")[0] for v in variants] == [f"{m}-s{s}" for m in ("none", "linear", "full", "memorizing")
                                                   for s in (0, 1)]
    assert all("model.init_from=outputs/mini/booksum_gpu_base/s1/model.safetensors" in v for v in variants)
    assert len(variants) <= int(short[short.index("--per-gpu") + 1])  # all at once, as measured


def test_the_variants_summary_shows_rouge_and_the_oracle_by_input_length(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from passkey_gpu_variants import summary_row, write_summary

    results = {"booksum/overall": 9.0, "booksum/overall@512": 3.0, "booksum/overall@32K": 9.0,
               "booksum/oracle_memory/overall@512": 4.2, "booksum/oracle_local/overall@512": 0.0,
               "booksum/events_beyond_window@512": 0.02, "booksum/input_tokens@512": 512.0}
    (tmp_path / "linear-s0").mkdir()
    (tmp_path / "linear-s0" / "results.json").write_text(json.dumps({"results": results}))
    row = summary_row("linear-s0", ["memory=linear"], "0", 12.0, 0, False, tmp_path)
    assert row["status"] == "ok" and "booksum/input_tokens@512" not in row
    write_summary([row], tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert ("| booksum/overall | booksum/overall@512 | booksum/overall@32K | booksum/oracle_memory/overall@512 | "
            "booksum/oracle_local/overall@512 | booksum/events_beyond_window@512 |") in table


def test_without_rouge_score_the_run_stops_before_training_with_one_line(tmp_path):
    """The package that scores the summaries is checked at the start: a machine without it (an offline GPU node, say)
    learns so in a second, not after the whole training."""
    blocked = tmp_path / "site" / "rouge_score"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'rouge_score'\")\n")
    out = tmp_path / "run"
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), ENV.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "run.py", "task=booksum", "trainer.steps=2", "logger=none",
                           "trainer.progress=false", f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: task: booksum scores summaries with ROUGE" in proc.stderr and "pip install rouge-score" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "metrics.jsonl").exists()  # no step was trained

"""Passkey retrieval: sample format, length, depth and seeding; scoring; streaming evaluation in constant memory."""
import json
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from infini_bench.errors import ConfigError
from infini_bench.model import build_model
from infini_bench.tokenizer import ByteTokenizer
from infini_bench.tracking import Run
from tasks import passkey_plots
from tasks.passkey import evaluate_batch, evaluate_samples
from tasks.passkey_data import (DESCRIPTION, FILLER, NEEDLE, QUESTION, Outcome, PasskeyBatches, PasskeySample,
                                chance_accuracy, exact_match, make_sample, segments_back, summarise, token_accuracy)
from tasks.runner import run_task

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TOK = ByteTokenizer()


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["task=passkey", "logger=none", *overrides])


@pytest.fixture(scope="module")
def books_dir():
    from infini_bench.data import corpus_dir

    return corpus_dir() / "pg_books"


def test_sample_is_the_papers_prompt():
    s = make_sample(2000, 0.5, seed=3, tokenizer=TOK)
    assert s.passkey.isdigit() and 1 <= int(s.passkey) <= 50000
    assert s.input_ids == TOK.encode(s.text)  # byte tokens: the pieces' encodings are the text's
    lines = s.text.split("\n")
    needle = NEEDLE.format(key=s.passkey)
    assert lines[0] == DESCRIPTION and lines[-1] == QUESTION and lines[2] == needle
    assert needle == f"The pass key is {s.passkey}. Remember it. {s.passkey} is the pass key."
    repeated = " ".join([FILLER] * 100)
    for filler in (lines[1], lines[3]):  # the filler, repeated, cut after a word
        assert len(filler) > len(FILLER) and repeated.startswith(filler) and repeated[len(filler)] == " "
    assert TOK.decode(s.input_ids[s.needle_start: s.needle_end]) == needle + "\n"
    assert TOK.decode(s.input_ids[s.needle_start: s.key_end]).endswith(f"Remember it. {s.passkey}")
    assert TOK.decode(s.answer_ids) == f" {s.passkey}."
    assert [TOK.decode([t]) for t, scored in zip(s.answer_ids, s.scored) if scored] == list(s.passkey)


@pytest.mark.parametrize("haystack", ["repeat", "books"])
@pytest.mark.parametrize("length", [400, 1000, 4096, 65536])
def test_length_within_one_percent(length, haystack, books_dir):
    for depth in (0.0, 0.3, 1.0):
        s = make_sample(length, depth, seed=length, tokenizer=TOK, haystack=haystack, books_dir=books_dir)
        assert abs(len(s.input_ids) - length) <= 0.01 * length, (depth, len(s.input_ids))


@pytest.mark.parametrize("haystack", ["repeat", "books"])
def test_depth_places_the_needle(haystack, books_dir):
    length = 8192
    head, question = len(TOK.encode(DESCRIPTION + "\n")), len(TOK.encode(QUESTION))
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        s = make_sample(length, depth, seed=1, tokenizer=TOK, haystack=haystack, books_dir=books_dir)
        filler = len(s.input_ids) - head - question - (s.needle_end - s.needle_start)
        before = s.needle_start - head
        assert abs(before / filler - depth) < 0.005, depth
    first = make_sample(length, 0.0, seed=1, tokenizer=TOK)
    last = make_sample(length, 1.0, seed=1, tokenizer=TOK)
    assert first.needle_start == head  # start: right after the task description
    assert last.needle_end == len(last.input_ids) - question  # end: right before the question


def test_seed_fixes_key_and_layout(books_dir):
    a = make_sample(3000, None, seed=11, tokenizer=TOK, haystack="books", books_dir=books_dir)
    assert a == make_sample(3000, None, seed=11, tokenizer=TOK, haystack="books", books_dir=books_dir)
    others = [make_sample(3000, None, seed=s, tokenizer=TOK, haystack="books", books_dir=books_dir)
              for s in range(12, 20)]
    assert len({o.passkey for o in others}) >= 7
    assert len({o.needle_start for o in others}) >= 7  # depth drawn from the seed
    assert len({o.text.split("\n")[1][:40] for o in others}) >= 7  # book and place in it drawn from the seed
    keys = [int(make_sample(400, 0.5, seed=s, tokenizer=TOK).passkey) for s in range(300)]
    assert min(keys) >= 1 and max(keys) <= 50000 and max(keys) > 40000
    assert {len(str(k)) for k in keys} >= {4, 5}  # up to five digits
    narrow = make_sample(400, 0.5, seed=0, tokenizer=TOK, key_range=(10, 99))
    assert len(narrow.passkey) == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="depth"):
        make_sample(1000, 1.5, 0, TOK)
    with pytest.raises(ValueError, match="shorter"):
        make_sample(100, 0.5, 0, TOK)
    with pytest.raises(ValueError, match="haystack"):
        make_sample(1000, 0.5, 0, TOK, haystack="lorem")


def one_hot_logits(tokens, vocab=259):
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 5.0


def test_token_accuracy_on_hand_made_logits():
    answer = TOK.encode(" 4096.")  # space, 4 digits, period
    scored = [False, True, True, True, True, False]
    assert token_accuracy(one_hot_logits(answer), answer, scored) == 1.0
    wrong = TOK.encode("x4x96x")  # space and period wrong but unscored, one digit of four wrong
    assert token_accuracy(one_hot_logits(wrong), answer, scored) == 0.75
    assert token_accuracy(one_hot_logits(TOK.encode("x1234x")), answer, scored) == 0.0
    with pytest.raises(ValueError):
        token_accuracy(one_hot_logits(answer), answer, [False] * 6)


def test_exact_match():
    assert exact_match(" 4096.", "4096") and exact_match("4096", "4096") and exact_match(" 4096 is it", "4096")
    assert not exact_match(" 40961", "4096")  # a longer number is wrong
    assert not exact_match(" 409", "4096") and not exact_match(" the key", "4096") and not exact_match("", "4096")


def test_chance_accuracy_known_value():
    # Keys 1..30: guess '1' first (11 keys start with it), then '0' after any digit. Worked out by hand:
    # key 1 scores 1, key 10 scores 1, keys 11-19 score 1/2, keys 20 and 30 score 1/2: 7.5 / 30.
    assert chance_accuracy((1, 30)) == pytest.approx(0.25)
    assert chance_accuracy((1, 9)) == pytest.approx(1 / 9)
    assert chance_accuracy() == pytest.approx(0.1246, abs=1e-4)


def test_segments_back_known_values():
    s = PasskeySample("", [0] * 200, "1", needle_start=40, needle_end=110, key_end=100, answer_ids=[1],
                      scored=[True])
    assert segments_back(s, 64) == 3 - 1
    assert segments_back(s, 256) == 0
    assert segments_back(s._replace(key_end=129), 128) == 0  # the key's last token shares the question's segment
    assert segments_back(s._replace(key_end=128, needle_end=140), 128) == 1  # the rest of the needle may not


def test_segments_back_counts_from_where_the_last_digit_is_predicted():
    """A prompt one token short of a segment boundary: its first digit is predicted in the key's segment, the
    others in the next, where local attention no longer sees the key. Such a sample is not a same-segment one."""
    tok = ByteTokenizer()
    sample = make_sample(2048, 1.0, 1237, tok, "repeat", (1, 50000))  # a 4-digit key, the prompt 2,047 tokens
    assert len(sample.input_ids) == 2047 and (sample.key_end - 1) // 256 == 7
    assert segments_back(sample, 256) == 1
    assert segments_back(sample, 512) == 1 and segments_back(sample, 4096) == 0
    cut = sample._replace(scored=[c.isdigit() and i == 1 for i, c in enumerate(" " + sample.passkey + ".")])
    assert segments_back(cut, 256) == 0  # only the first digit scored: predicted before the boundary


def test_summary_splits_by_where_the_key_sat():
    outcomes = [Outcome(1.0, True, " 7.", 3), Outcome(0.0, False, " 1.", 0), Outcome(0.5, False, " 12.", 1)]
    s = summarise(outcomes)
    assert (s["n"], s["acc"], s["exact"], s["segments_back"]) == (3, 0.5, pytest.approx(1 / 3), pytest.approx(4 / 3))
    assert (s["n_earlier"], s["acc_earlier"], s["exact_earlier"]) == (2, 0.75, 0.5)
    assert (s["n_same"], s["acc_same"], s["exact_same"]) == (1, 0.0, 0.0)
    assert summarise(outcomes[:1])["acc_same"] is None


def tiny_model(rule="linear", segment_len=32, **arch):
    torch.manual_seed(0)
    model = build_model("tiny", memory=rule, segment_len=segment_len, **arch).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 2)
    return model


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_streaming_evaluation_equals_a_full_forward(rule):
    """Token accuracy and greedy decoding, streamed, against one parallel forward / re-forward per token."""
    model = tiny_model(rule)
    s = make_sample(300, 0.4, seed=5, tokenizer=TOK)  # 300 tokens: the prompt ends inside a segment
    ids = torch.tensor([s.input_ids + s.answer_ids])
    p, n = len(s.input_ids), len(s.answer_ids)
    with torch.no_grad():
        greedy = list(s.input_ids)
        for _ in range(n):
            greedy.append(model(torch.tensor([greedy])).logits[0, -1].argmax().item())
        forced = model(ids).logits[0, p - 1: p - 1 + n]
    new = greedy[p:]
    out = evaluate_batch(model, [s], TOK)[0]
    assert out.generated == TOK.decode(new)
    assert out.token_acc == token_accuracy(forced, s.answer_ids, s.scored)
    # With the model's own greedy answer as the reference, teacher forcing must score every token right.
    own = evaluate_batch(model, [s._replace(answer_ids=new, scored=[True] * n)], TOK)[0]
    assert own.token_acc == 1.0



@pytest.mark.parametrize("rule", ["linear", "txl", "full"])
def test_decoding_through_generate_equals_a_plain_greedy_loop(rule):
    """The answer decoded by generate's fixed-shape step (the CUDA graph's, eager on a CPU; full attention decodes
    eagerly) against an argmax loop that reruns the whole sequence per token. The prompts end three tokens
    before a segment boundary, so the five-digit answer crosses it."""
    model = tiny_model(rule, segment_len=16)
    samples = [make_sample(300, d, seed=9 + i, tokenizer=TOK, key_range=(10000, 99999)) for i, d in enumerate((0, 1))]
    cut = min(len(s.input_ids) for s in samples) // 16 * 16 - 3
    samples = [s._replace(input_ids=s.input_ids[:cut - 1] + s.input_ids[-1:]) for s in samples]
    answers = []
    with torch.no_grad():
        for s in samples:
            ids = list(s.input_ids)
            for _ in s.answer_ids:
                ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
            answers.append(TOK.decode(ids[len(s.input_ids):]))
    assert len(samples[0].answer_ids) == 7 and len(samples[0].input_ids) % 16 == 13
    assert [o.generated for o in evaluate_batch(model, samples, TOK)] == answers


@pytest.mark.parametrize("rule", ["linear", "delta", "memorizing", "rmt", "full"])
def test_batched_evaluation_equals_one_by_one(rule):
    """A batch streams its shortest prompt together, then each group of equal prompt and answer lengths goes on
    alone: prompts a few tokens apart (the filler is cut after a word), keys of 1 to 5 digits, and a prompt a
    segment and more longer, all in one batch, score as each does alone."""
    model = tiny_model(rule, token_shift=True)
    with torch.no_grad():  # the shift's zero init would hide a row mix-up in its carried embedding
        model.token_shift.normal_(0, 0.5)
    five, one = (10000, 50000), (1, 9)  # keys of 5 digits and of 1
    layouts = [(400, 0.5, 2, five), (400, 0.0, 1, five), (400, 0.5, 3, five), (400, 0.5, 2, one), (400, 1.0, 4, five),
               (400, 0.5, 3, one), (450, 0.3, 6, five)]
    samples = [make_sample(n, d, seed=i, tokenizer=TOK, key_range=keys) for n, d, i, keys in layouts]
    groups = Counter((len(s.input_ids), len(s.answer_ids)) for s in samples)
    assert groups[401, 7] == groups[399, 7] == groups[398, 3] == 2 and len(groups) == 4  # pairs, rows interleaved
    batched = evaluate_samples(model, samples, TOK, batch_size=7)
    single = [evaluate_batch(model, [s], TOK)[0] for s in samples]
    assert [(o.generated, o.segments_back) for o in batched] == [(o.generated, o.segments_back) for o in single]
    assert [o.token_acc for o in batched] == pytest.approx([o.token_acc for o in single])


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting every storage an op allocates."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _release(self, ptr, nbytes):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr not in self.refs:
                    self.refs[ptr] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr, nbytes)
        return out


def peak_bytes(fn) -> int:
    with PeakTensorBytes() as mode:
        fn()
    return mode.peak


def test_streaming_memory_does_not_grow_with_length():
    # The tiny flavour made narrower still, so that 72K tokens stream in a few seconds on a CPU.
    model = tiny_model(segment_len=256, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    short, long = (make_sample(n, 0.0, seed=2, tokenizer=TOK) for n in (8192, 65536))
    assert len(long.input_ids) >= 8 * len(short.input_ids) - 100
    peak_short = peak_bytes(lambda: evaluate_batch(model, [short], TOK))
    peak_long = peak_bytes(lambda: evaluate_batch(model, [long], TOK))
    prompt_growth = 8 * (len(long.input_ids) - len(short.input_ids))  # the int64 prompt itself is O(T)
    assert peak_long - peak_short <= prompt_growth + 64 * 1024, (peak_short, peak_long)
    # The meter does see O(T) activations: a one-shot forward over the prompt grows with it.
    with torch.no_grad():
        full = [peak_bytes(lambda k=k: model(torch.tensor([short.input_ids[: 4096 * k]]))) for k in (1, 2)]
    assert full[1] > 1.8 * full[0]


def test_batches_are_deterministic_and_label_the_answer():
    batches = PasskeyBatches(TOK, (300, 420), batch_size=3, seed=7)
    a, b = batches(4), batches(4)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(batches(5)["input_ids"][:, :200], a["input_ids"][:, :200]) or \
        a["input_ids"].shape != batches(5)["input_ids"].shape
    for ids, labels in zip(a["input_ids"], a["labels"]):
        where = (labels != -100).nonzero().flatten()
        assert torch.equal(labels[where], ids[where + 1])  # labels[t] is token t + 1
        answer = TOK.decode(labels[where].tolist())
        key = TOK.decode(ids.tolist()).split("The pass key is ")[1].split(".")[0]
        assert answer == f" {key}."
        assert TOK.decode(ids[: where[0] + 1].tolist()).endswith(QUESTION)
    everything = PasskeyBatches(TOK, (300, 300), batch_size=1, seed=7, loss_on="all")(0)
    assert (everything["labels"][0, :-1] == everything["input_ids"][0, 1:]).all()


@pytest.mark.parametrize("override, key", [
    ("task.depths=[top]", "task.depths"), ("task.haystack=lorem", "task.haystack"),
    ("task.lengths=[100]", "task.lengths"), ("task.key_range=[1,100000]", "task.key_range"),
    ("task.loss_on=prompt", "task.loss_on"), ("task.depth_sweep=1", "task.depth_sweep"),
    ("task.local_warmup_steps=-1", "task.local_warmup_steps"), ("task.train_lengths=[10,300]", "task.train_lengths"),
    ("+task.warmup_steps=3", "task.warmup_steps"),  # renamed: an experiment file may still set it
])
def test_config_errors_name_the_key(override, key, tmp_path):
    cfg = config(override, "trainer.steps=1")
    with pytest.raises(ConfigError) as err:
        run_task(cfg, Run(tmp_path, {}, device="cpu"))
    assert err.value.key == key


def last_gates(out_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for row in rows for k, v in row.items() if k.startswith("gates/")}


def test_end_to_end_smoke(tmp_path):
    small = ["trainer.batch_size=2", "trainer.progress=false", "task.samples=2", "task.lengths=[400,700]"]
    cfg = config(*small, "trainer.steps=2", "task.local_warmup_steps=1", "task.local_warmup_segment_len=128",
                 "task.train_lengths=[300,320]", "task.depth_sweep=3")
    run = Run(tmp_path / "train", {}, device="cpu")
    results = run_task(cfg, run)
    run.finish(results)
    assert set(results) >= {f"passkey/acc@{n}/{d}" for n in (400, 700) for d in ("0.00", "0.50", "1.00")}
    assert results["train/steps"] == 1 + 2 and len(results["passkey/grid"]) == 6
    assert any((run.out_dir / "checkpoints" / "warmup").iterdir())  # the warm-up phase ran first, on its own
    steps = [row["step"] for row in map(json.loads, (run.out_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 3  # the main phase logs after the warm-up
    assert results["passkey/n/earlier_segment"] + results["passkey/n/same_segment"] == 12
    assert 0.0 <= results["passkey/acc"] <= 1.0 and 0.0 <= results["passkey/exact"] <= 1.0
    assert json.loads((run.out_dir / "results.json").read_text())["results"]["passkey/grid"][0]["n"] == 2
    assert (run.out_dir / "passkey_heatmap.png").stat().st_size > 1000
    assert (run.out_dir / "tables" / "passkey_grid.json").exists()
    trained = last_gates(run.out_dir)
    assert any(abs(g - 0.5) > 1e-4 for g in trained.values())  # two steps at the gate's lr moved them off 0.5

    # Zero-shot from the weights the run wrote: the gates are the trained ones, not the initial 0.5.
    weights = run.out_dir / "model.safetensors"
    cfg = config(*small, "task.zero_shot=true", f"model.init_from={weights}")
    again = Run(tmp_path / "zero_shot", {}, device="cpu")
    zero_shot = run_task(cfg, again)
    assert zero_shot["train/steps"] == 0 and not (again.out_dir / "model.safetensors").exists()
    assert last_gates(again.out_dir) == pytest.approx(trained, abs=1e-6)
    with pytest.raises(ConfigError, match="model.init_from"):
        run_task(config(*small, f"model.init_from={tmp_path / 'missing.safetensors'}"), again)


@pytest.mark.parametrize("bins", [3, 12])
def test_the_distance_plot_keeps_its_labels_inside_and_shows_both_lines_where_they_meet(bins, assert_labels_inside,
                                                                                         tmp_path):
    import matplotlib.pyplot as plt

    rows = [{"segments_back_min": 2 ** (b - 1) if b else 0, "segments_back_max": 2 ** b - 1 if b else 0, "n": 4,
             "acc": 1.0, "exact": 1.0} for b in range(bins)]  # token accuracy and exact match the same everywhere
    fig = passkey_plots.distance_figure(rows, "passkey by distance, memory=linear, 400 training steps", chance=0.1)
    assert_labels_inside(fig)
    acc, exact = fig.axes[0].get_lines()[:2]
    assert (acc.get_label(), exact.get_label()) == ("token accuracy", "exact match")
    assert acc.get_linestyle() != exact.get_linestyle() and acc.get_marker() != exact.get_marker()
    assert exact.get_markerfacecolor() == "none" and acc.get_linewidth() > exact.get_linewidth()  # the top one
    plt.close(fig)  # is hollow and thin, the one beneath thick: both show
    assert passkey_plots.distance_plot(rows, tmp_path / "by_distance.png", "t").stat().st_size > 1000


def test_the_distance_plot_puts_every_bin_at_its_place_and_an_empty_one_is_a_gap(assert_labels_inside):
    """Keys 0, 1, 2-3, 8-15 and 512-1023 segments back: 4-7 and 16-511 are empty, each a gap with its tick, so a
    line never joins 2-3 to 8-15 as if they were neighbours."""
    import math

    import matplotlib.pyplot as plt

    rows = [{"segments_back_min": lo, "segments_back_max": hi, "n": n, "acc": acc, "exact": exact}
            for lo, hi, n, acc, exact in ((0, 0, 8, 1.0, 1.0), (1, 1, 4, 0.75, 0.5), (2, 3, 4, 0.5, 0.25),
                                          (8, 15, 2, 0.25, 0.0), (512, 1023, 6, 0.5, 0.5))]
    fig = passkey_plots.distance_figure(rows, "passkey by distance, memory=linear, 400 training steps", chance=0.1)
    ax = fig.axes[0]
    ticks = ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-255", "256-511", "512-1023"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ticks and list(ax.get_xticks()) == list(range(11))
    acc, exact = ax.get_lines()[:2]
    expected = {0: 100, 1: 75, 2: 50, 4: 25, 10: 50}  # tick position: token accuracy %, NaN elsewhere
    assert [expected.get(i) for i in range(11)] == [None if math.isnan(y) else y for y in acc.get_ydata()]
    assert [y for y in exact.get_ydata() if not math.isnan(y)] == [100, 50, 25, 0, 50]
    notes = {t.get_text(): t.xy[0] for t in ax.texts}
    assert notes["n=6"] == 10 and notes["n=2"] == 4 and "n=0" in notes
    assert sum(t.get_text() == "n=0" for t in ax.texts) == 6  # 4-7 and 16-31 ... 256-511
    assert_labels_inside(fig)
    canvas_box = fig.bbox
    for label in ax.get_xticklabels():  # the slanted ticks too
        box = label.get_window_extent()
        assert canvas_box.x0 <= box.x0 and box.x1 <= canvas_box.x1 and canvas_box.y0 <= box.y0, label.get_text()
    plt.close(fig)


def test_the_main_phases_run_takes_every_argument_the_run_does(tmp_path):
    """The trainer logs the main phase through _StepOffset: a Run parameter it lacks fails only mid-training."""
    import inspect

    from infini_bench.tracking import Run, read_metrics
    from tasks.passkey import _StepOffset

    for name in ("log", "log_image", "log_table", "truncate_metrics"):
        assert inspect.signature(getattr(_StepOffset, name)).parameters.keys() == \
            inspect.signature(getattr(Run, name)).parameters.keys(), name
    run = Run(tmp_path, {}, device="cpu")
    _StepOffset(run, 10).log({"train/loss": 1.0}, step=3, file_only={"gates/L0/H0": 0.5})
    assert read_metrics(run.metrics_path) == [{"step": 13, "train/loss": 1.0, "gates/L0/H0": 0.5}]


def test_a_time_budget_reports_the_steps_trained_not_the_cap(tmp_path, monkeypatch):
    """trainer.time_budget_s ends the memory phase before trainer.steps: results.json's train/steps and the step
    the final results are logged at count the warm-up and the memory-phase steps actually trained."""
    import infini_bench.train as train_module

    clock = iter(range(0, 10_000, 10))  # a step reads the clock at its start and end: 10 s per step
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(clock)))
    cfg = config("trainer.batch_size=2", "trainer.progress=false", "task.samples=2", "task.lengths=[400]",
                 "trainer.steps=1000", "trainer.time_budget_s=25", "task.local_warmup_steps=2",
                 "task.local_warmup_segment_len=128", "task.train_lengths=[300,320]")
    run = Run(tmp_path, {}, device="cpu")
    results = run_task(cfg, run)
    assert results["train/steps"] == 2 + 3  # 30 s >= 25 s after the main phase's third step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 5 and any("passkey/acc" in r and r["step"] == 5 for r in rows)

"""Multi-query associative recall: the sample layout, the accuracy against a parallel forward, memory=none at chance
and memory=full carrying a pair across segments, bad values, and a run of run.py end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from infini_bench.errors import ConfigError
from infini_bench.evaluate import streamed_hits
from infini_bench.model import build_model
from infini_bench.tracking import Run
from tasks.recall import Layout, RecallBatches, by_distance, draw_samples, make_batch, make_sample
from tasks.runner import run_task

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = Layout(segment_len=8, vocab=10, filler=4)


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=recall", "logger=none", "trainer.progress=false", *overrides])


@pytest.mark.parametrize("pairs, gap", [(1, 0), (3, 1), (5, 2), (4, 3), (9, 1)])
def test_a_sample_is_pairs_on_a_boundary_then_whole_filler_segments_then_the_keys_again(pairs, gap):
    check_sample(make_sample(LAYOUT, pairs, gap, seed=7), 0, pairs, gap)
    # A training batch is drawn rows at once: every row is a whole sample of its own, none mixed with another.
    rows = draw_samples(LAYOUT, pairs, gap, 4, torch.Generator().manual_seed(7))
    for row in range(4):
        check_sample(rows, row, pairs, gap)
    if pairs > 1:
        assert len({tuple(r.tolist()) for r in rows.input_ids}) == 4


def check_sample(s, row: int, pairs: int, gap: int) -> None:
    """Row `row` of s checked token by token against the layout, in plain Python."""
    n, vocab = LAYOUT.segment_len, LAYOUT.vocab
    tokens = s.input_ids[row].tolist()  # the whole sequence but its last token, the slot after the last query
    assert len(tokens) == LAYOUT.length(pairs, gap) - 1
    region = -(-2 * pairs // n) * n  # the pairs end on a segment boundary
    pad, written, gap_tokens, asked = (tokens[: region - 2 * pairs], tokens[region - 2 * pairs: region],
                                       tokens[region: region + gap * n], tokens[region + gap * n:])
    keys, values = written[0::2], written[1::2]
    filler = range(2 * vocab, 2 * vocab + LAYOUT.filler)
    assert all(t in filler for t in pad + gap_tokens) and len(gap_tokens) == gap * n
    assert len(set(keys)) == pairs and all(0 <= k < vocab for k in keys)  # distinct keys, ranges disjoint
    assert all(vocab <= v < 2 * vocab for v in values)
    assert sorted(asked[0::2]) == sorted(keys)
    assert all(t in filler for t in asked[1::2])  # after each query key a filler token: no answer is shown
    # Labelled: at each query key's position, the value written with that key; nothing else.
    pairs_written = dict(zip(keys, values))
    scored = (s.labels[row] != -100).nonzero().flatten().tolist()
    assert scored == list(range(region + gap * n, len(tokens), 2))
    assert s.labels[row, scored].tolist() == [pairs_written[k] for k in asked[0::2]]
    order = [keys.index(k) for k in asked[0::2]]
    back = [(p // n) - (region - 2 * pairs + 2 * i + 1) // n for p, i in zip(scored, order)]
    assert s.segments_back[row].tolist() == back and min(back) >= gap + 1  # never the query's own segment


def test_answering_by_elimination_does_no_better_than_guessing_among_the_values_written():
    """A model that never looks a key up could still answer by elimination if the answers were shown: name a
    value written but not yet seen after a query. That scores H(P) / P (0.34 at 8 pairs) where guessing among the
    written values scores 1 / P. With no answer in the inputs it is guessing."""
    layout, pairs, hits, total = Layout(segment_len=16, vocab=64, filler=8), 8, 0, 0
    batch = draw_samples(layout, pairs, 1, 500, torch.Generator().manual_seed(0))
    first = layout.length(pairs, 1) - 2 * pairs
    for tokens, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        written = tokens[first - 2 * layout.segment_len + 1: first - layout.segment_len: 2]  # gap 1: one segment
        for t in range(first, len(tokens), 2):
            shown = set(tokens[first: t + 1])
            guess = next((v for v in written if v not in shown), written[0])
            hits += guess == labels[t]
            total += 1
    assert total == 500 * pairs and abs(hits / total - 1 / pairs) < 0.03, hits / total


def test_samples_are_pure_functions_of_their_seed_and_differ_across_gaps_only_in_distance():
    a, b = make_sample(LAYOUT, 4, 1, seed=3), make_sample(LAYOUT, 4, 1, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.input_ids, make_sample(LAYOUT, 4, 1, seed=4).input_ids)
    far = make_sample(LAYOUT, 4, 3, seed=3)  # the same pairs and queries, two more filler segments between
    assert torch.equal(a.labels[a.labels != -100], far.labels[far.labels != -100])
    assert torch.equal(far.segments_back, a.segments_back + 2)
    batches = RecallBatches(LAYOUT, pairs=6, gap=2, batch_size=3, seed=0)
    first, again = batches(5), RecallBatches(LAYOUT, pairs=6, gap=2, batch_size=3, seed=0)(5)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    drawn = [batches(i) for i in range(200)]
    counts = {int((b["labels"][0] != -100).sum()) for b in drawn}
    lengths = {b["input_ids"].shape[1] for b in drawn}
    assert counts == set(range(1, 7))  # every count up to the maximum
    floor = RecallBatches(LAYOUT, pairs=6, gap=2, batch_size=3, seed=0, min_pairs=3)
    assert {int((floor(i)["labels"][0] != -100).sum()) for i in range(200)} == {3, 4, 5, 6}
    assert {LAYOUT.length(p, g) - 1 for p in (1, 6) for g in (0, 2)} <= lengths  # every gap up to the maximum


def test_streamed_hits_equal_the_argmax_of_one_parallel_forward():
    """memory=full streamed one segment at a time sees what one causal pass over the whole sample sees."""
    torch.manual_seed(0)
    model = build_model("tiny", segment_len=LAYOUT.segment_len, memory="full").eval()
    batch = make_batch(LAYOUT, 5, 2, range(3))
    hits = streamed_hits(model, batch.input_ids, batch.labels, "fp32")
    with torch.no_grad():
        expected = model(batch.input_ids).logits.argmax(-1) == batch.labels
    assert torch.equal(hits, expected) and not hits[batch.labels == -100].any()


def test_accuracy_by_distance_bins_powers_of_two():
    hits = torch.tensor([True, False, True, True, False, True])
    back = torch.tensor([1, 2, 3, 5, 7, 8])
    assert by_distance(hits, back) == [{"segments_back": "1", "n": 1, "acc": 1.0},
                                       {"segments_back": "2-3", "n": 2, "acc": 0.5},
                                       {"segments_back": "4-7", "n": 2, "acc": 0.5},
                                       {"segments_back": "8-15", "n": 1, "acc": 1.0}]


# Four pairs across filler segments, with the token shift (docs/RECALL.md): a lookup, since copying a value of the
# sample scores 1/4 and the answers are never shown. On 2 cores, 600 steps of 32 samples take about 20 s a run; seeds
# 0, 1 and 2 of memory=full all answered 100% at gaps 1 and 2. Transformer-XL sees the pairs at gap 0, inside its
# one cached segment (0.87 at seed 0); memory=none, which never sees a pair, is at chance (1/16).
SMALL = ["model.segment_len=16", "model.arch={dim:64,n_heads:2,n_kv_heads:2,head_dim:32,ffn_dim:128,token_shift:true}",
         "task.vocab=16", "task.pairs=4", "task.min_pairs=2", "task.eval_pairs=[4]", "task.samples=64",
         "task.eval_batch=64", "trainer.steps=600", "trainer.batch_size=32", "trainer.lr=3e-3",
         "trainer.warmup_steps=20", "trainer.eval_every=1000", "trainer.ckpt_every=1000"]


@pytest.mark.parametrize("memory, gaps, low, high", [("full", [1, 2], 0.95, 1.0), ("txl", [0], 0.6, 1.0),
                                                     ("none", [1, 2], 0.0, 0.15)])
def test_a_memory_looks_the_keys_up_and_local_attention_cannot(memory, gaps, low, high, tmp_path):
    train_gap = f"task.gap_segments={max(gaps)}"
    results = run_task(config(f"memory={memory}", *SMALL, train_gap, f"task.eval_gaps={gaps}"),
                       Run(tmp_path, {}, device="cpu"))
    assert results["recall/chance"] == 1 / 16
    for gap in gaps:
        assert low <= results[f"recall/acc@pairs=4,gap={gap}"] <= high, results
    assert (tmp_path / "recall_grid.png").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["task.vocab=200"], "task.vocab: 200: keys, values and filler take 2 x 200 + task.filler=16 = 416 token ids, "
                         "more than the model's vocab_size 259"),
    (["task.pairs=65"], "task.pairs: 65 pairs need as many distinct keys, more than task.vocab=64"),
    (["task.eval_pairs=[8,100]"], "task.eval_pairs: 100 pairs need as many distinct keys, more than task.vocab=64"),
    (["task.eval_gaps=[]"], "task.eval_gaps: [] must be a non-empty list of integers >= 0"),
    (["task.gap_segments=-1"], "task.gap_segments: -1 must be an integer >= 0"),
    (["task.min_pairs=9", "task.pairs=8"], "task.min_pairs: 9 is more than task.pairs=8"),
])
def test_a_bad_value_is_one_line_naming_its_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_task(config("trainer.steps=1", *overrides), Run(tmp_path, {}, device="cpu"))
    assert str(err.value) == message
    assert not (tmp_path / "checkpoints").exists()


def test_run_py_writes_the_grid_to_results_json(tmp_path):
    out = tmp_path / "run"
    args = ["task=recall", "model=tiny", "trainer.steps=2", "trainer.batch_size=2", "task.samples=2",
            "task.eval_pairs=[2,20]", "task.eval_gaps=[0,1]", "logger=none", "trainer.progress=false",
            f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())["results"]
    cells = [f"recall/acc@pairs={p},gap={g}" for p in (2, 20) for g in (0, 1)]
    assert all(0 <= r[k] <= 1 for k in cells + ["recall/acc", "recall/acc@pairs=20", "recall/acc@gap=0"])
    assert r["recall/acc"] == pytest.approx(sum(r[k] for k in cells) / 4)
    assert [row["n"] for row in r["recall/grid"]] == [4, 4, 40, 40] and r["train/steps"] == 2
    assert r["footprint/seq_len"] == 64 + 64 + 40  # 20 pairs fill a whole segment of 64, a gap, the queries
    bins = {d["segments_back"] for d in r["recall/by_segments_back"]}
    assert {"1", "2-3"} <= bins and "recall/acc@segments_back=1" in r
    assert (out / "recall_grid.png").is_file() and (out / "model.safetensors").is_file()


def test_make_recall_grid_runs_every_memory_with_two_seeds_on_a_recipe_that_fits_its_model(variant_calls):
    """`make recall-grid` as it would run, and its recipe checked as a run would check it, before GPU time."""
    from tasks.runner import model_config
    from tasks.recall import check_config

    (words,) = variant_calls("recall-grid")
    assert words[words.index("--experiment") + 1] == "recall_gpu"
    variants = sorted(words[i + 1] for i, w in enumerate(words) if w == "--variant")
    memories = sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml"))
    knn = " memory.knn_size=4096"  # a smaller store than the paper's, large enough that nothing is evicted
    assert variants == [f"{m}-s{s}=memory={m} seed={s}{knn if m == 'memorizing' else ''}"
                        for m in memories for s in (0, 1)]
    cfg = config("experiment=recall_gpu")
    t = cfg.task
    assert (list(t.eval_pairs), list(t.eval_gaps)) == ([8, 32, 128, 512], [1, 4, 16])
    check_config(t)
    assert 2 * t.vocab + t.filler <= model_config(cfg).vocab_size
    layout = Layout(cfg.model.segment_len, t.vocab, t.filler)
    longest = max(layout.length(max(t.eval_pairs), max(t.eval_gaps)), layout.length(t.pairs, t.gap_segments))
    assert longest <= 4096  # every token of the longest sample, training or evaluation, stays in the store


def test_the_variants_summary_shows_recall_by_gap_and_pair_count_not_every_cell(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from passkey_gpu_variants import summary_row, write_summary

    results = {"recall/acc": 0.5, "recall/chance": 0.001, "recall/acc@gap=1": 0.75, "recall/acc@pairs=8": 0.9,
               "recall/acc@pairs=8,gap=1": 1.0, "recall/acc@segments_back=2-3": 0.6}
    (tmp_path / "linear-s0").mkdir()
    (tmp_path / "linear-s0" / "results.json").write_text(json.dumps({"results": results}))
    row = summary_row("linear-s0", ["memory=linear"], "0", 12.0, 0, False, tmp_path)
    assert row["status"] == "ok" and row["recall/acc"] == 0.5 and row["recall/acc@gap=1"] == 0.75
    assert "recall/acc@pairs=8,gap=1" not in row and row["recall/acc@pairs=8"] == 0.9
    write_summary([row], tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert "| recall/acc | recall/chance | recall/acc@gap=1 | recall/acc@pairs=8 |" in table


def test_a_time_budget_reports_the_steps_trained_not_the_cap(tmp_path, monkeypatch):
    """trainer.time_budget_s ends training before trainer.steps: results.json's train/steps and the step the final
    results are logged at are the steps trained."""
    import infini_bench.train as train_module

    clock = iter(range(0, 10_000, 10))  # a step reads the clock at its start and end: 10 s per step
    monkeypatch.setattr(train_module, "_clock", lambda: float(next(clock)))
    run = Run(tmp_path, {}, device="cpu")
    results = run_task(config(*SMALL, "trainer.steps=1000", "trainer.time_budget_s=25", "task.samples=4",
                              "task.eval_batch=4"), run)
    assert results["train/steps"] == 3  # 30 s >= 25 s after the third step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3 and any("recall/acc" in r and r["step"] == 3 for r in rows)

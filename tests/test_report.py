"""The report, built from small real runs, puts each of our numbers under the paper's column it belongs to, says
where its data came from, merges reruns, draws the figures; a run ends by printing its results table."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infini_bench.paper import TABLE2, TABLE3_LENGTHS
from infini_bench.report import build_report, find_results, results_table

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LM = ["task=lm", "trainer.steps=2", "task.seq_len=64", "task.eval_max_docs=1", "task.eval_max_tokens=128"]
PASSKEY = ["task=passkey", "trainer.steps=1", "task.local_warmup_steps=0", "task.lengths=[300,32768]",
           "task.samples=1", "task.val_samples=1", "task.train_lengths=[250,260]", "trainer.batch_size=2",
           "model.segment_len=1024"]
BOOKSUM = ["task=booksum", "trainer.steps=1", "trainer.batch_size=2", "task.eval_input_lens=[128,256]",
           "task.eval_books=2", "task.max_new_tokens=8", "task.synthetic.train_books=8", "task.train_input_len=128"]


def run(args: list[str], folder: str) -> str:
    proc = subprocess.run([sys.executable, "run.py", *args, "trainer.progress=false", folder], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    printed = {"sweep": run(["-m", *LM, "memory=linear,none"], f"hydra.sweep.dir={root / 'multirun'}")}
    for name, args in (("again", LM), ("passkey", PASSKEY), ("booksum", BOOKSUM)):
        printed[name] = run(args, f"hydra.run.dir={root / 'outputs' / name}")  # "again": the sweep's linear job
    # A run as the LM task writes it for hub PG19 (data/source "pg19=pg19"), made from a real run's results.
    none = next(p.parent for p in (root / "multirun").rglob("results.json") if "memory=none" in str(p))
    hub = root / "outputs" / "lm-pg19"
    shutil.copytree(none, hub)
    record = json.loads((hub / "results.json").read_text())
    record["config"]["task"]["dataset"] = "pg19"
    record["config"]["memory"]["name"] = "delta"
    record["results"]["data/source"] = "pg19=pg19"
    (hub / "results.json").write_text(json.dumps(record))
    return root, printed


def cells(text: str, header_start: str, row_start: str) -> dict[str, str]:
    """The row that starts with `row_start` of the table whose header starts with `header_start`, by column."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        if line.startswith(row_start):
            return dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    raise AssertionError(f"no row {row_start!r} under {header_start!r}")


@pytest.mark.slow
def test_report_aligns_our_runs_with_the_papers_columns(runs):
    root, _ = runs
    out = root / "docs" / "REPORT.md"
    found = find_results([root / "outputs", root / "multirun"])
    text = build_report(found, out)
    saved = {p.parent.name: json.loads(p.read_text()) for p in root.rglob("results.json")}

    # Duplicates merged: the rerun of lm-linear counts once, the latest copy.
    linear = [r for r in found if r["config"]["task"]["name"] == "lm" and r["config"]["memory"]["name"] == "linear"]
    assert len(linear) == 1 and linear[0]["path"].endswith("again") and linear[0]["merged"] == 2
    assert len([r for r in found if r["config"]["task"]["name"] == "lm"]) == 3

    # Table 2: the embedded run under "other data", named; the hub-PG19 run under PG19, beside the paper's row.
    header = "| memory | row |"
    ours = cells(text, header, "| linear | ours")
    ppl = saved["again"]["results"]["val/ppl"]
    assert ours["PG19"] == "" and ours["other data"] == f"{ppl:.2f} (embedded_pg19)"
    assert "latest of 2 runs" in ours["scale, command, run"] and "python run.py task=lm" in ours["scale, command, run"]
    hub = cells(text, header, "| delta | ours")
    assert hub["PG19"] == f"{saved['lm-pg19']['results']['val/ppl']:.2f}" and hub["other data"] == ""
    paper = cells(text, header, "| delta | paper")
    assert paper["PG19"] == str(TABLE2["Infini-Transformer (Linear + Delta)"]["pg19"]) and paper["memory (floats)"] == "1.6M"
    for memory in ("none", "full", "txl", "memorizing", "rmt"):
        assert f"| {memory} |" in text
    assert "| txl | paper: Transformer-XL | 50.3M | 2048 | 11.88 | 2.42 |" in text

    # Table 1: the formula's floats our linear run reported.
    floats = saved["again"]["results"]["footprint/paper_floats"]
    assert floats == 32 * 33 * 4 * 2 and f"| {floats:,} |" in text and "d_key (d_value + 1) H l" in text and "114x" in text

    # Table 3: the 32K result under the paper's 32K column, 300 tokens under other lengths.
    pk = saved["passkey"]["results"]
    row = cells(text, "| row | 32K |", "| ours:")
    expected = "/".join(f"{100 * pk[f'passkey/acc@32K/{d}']:.0f}" for d in ("start", "middle", "end"))
    assert row["32K"] == expected and all(row[label] == "" for label in TABLE3_LENGTHS[1:])
    assert row["other lengths"].startswith("300: ") and row["chance %"] == f"{100 * pk['passkey/chance']:.0f}"
    assert row["exact match %"] == f"{100 * pk['passkey/exact']:.0f}"

    # Table 4 and Figure 4: synthetic books named as such, lengths that are not the paper's under other lengths.
    bs = saved["booksum"]["results"]
    row = cells(text, "| row | R-1 |", "| ours:")
    assert row["overall"] == f"{bs['booksum/overall']:.2f}" and "synthetic" in row["data source"]
    sweep = cells(text, "| row | 16K |", "| ours:")
    assert sweep["16K"] == "" and f"256: {bs['booksum/overall@256']:.2f}" in sweep["other lengths"]

    # Figures next to the report, and each run's own.
    for name in ("loss_by_segment", "rouge_by_length", "lm_loss_curves", "passkey_loss_curves"):
        assert (out.parent / "report_img" / f"{name}.png").stat().st_size > 1000, name
    assert "](../outputs/passkey/passkey_heatmap.png)" in text and "](../outputs/again/gates.png)" in text
    assert not (root / "outputs" / "lm-pg19" / "gates.png").exists()  # a memory=none run: no gates to draw


@pytest.mark.slow
def test_a_run_ends_with_its_results_table(runs):
    root, printed = runs
    out = root / "outputs" / "passkey"
    record = json.loads((out / "results.json").read_text())
    table = results_table(record, out)
    assert table in printed["passkey"]
    res = record["results"]
    acc = next(line for line in table.splitlines() if line.startswith(" acc@32K"))
    assert "/".join(f"{100 * res[f'passkey/acc@32K/{d}']:.0f}" for d in ("start", "middle", "end")) in acc
    assert "(paper, fine-tuned)" in acc and "100/100/100" in acc  # the paper's fine-tuned linear row at 32K
    assert f"{100 * res['passkey/chance']:.1f} (chance)" in table
    assert f"outputs: {out}" in table and "results.json" in table
    again = json.loads((root / "outputs" / "again" / "results.json").read_text())
    assert results_table(again, root / "outputs" / "again") in printed["again"]
    assert printed["sweep"].count("paper / chance") == 2  # each job of a sweep prints its own


def _seed_run(root: Path, memory: str, seed: int, bpb: float, curve: list[float],
              gates: list[dict[str, float]] = ()) -> None:
    """A results.json as the LM task writes it, for one memory and seed of one recipe."""
    config = {"seed": seed, "name": f"lm_mini-{memory}", "memory": {"name": memory},
              "model": {"name": "lm_mini", "segment_len": 512},
              "task": {"name": "lm", "dataset": "python_code", "seq_len": 8192},
              "trainer": {"seed": seed, "steps": 700, "batch_size": 8, "grad_accum": 2}}
    results = {"test/bpb": bpb, "test/ppl": 2 ** bpb, "test/loss_by_segment": curve, "train/steps": 700,
               "train/seconds": 100.0, "footprint/paper_floats": 0, "footprint/state_floats": 0,
               "footprint/state_bytes": 0}
    folder = root / f"{memory}-s{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config, "results": results}))
    rows = [{"step": 10 * (k + 1), **g} for k, g in enumerate(gates)]  # gates logged at steps 10, 20, ...
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_seed_table_gives_mean_and_range_and_calls_a_difference_only_beyond_twice_the_range(tmp_path):
    curve = [1.0] + [0.9] * 15 + [0.8] * 8  # first segment, 8-15 and 16+ bands: 1.0, 0.9, 0.8
    for memory, seed, bpb in (("none", 0, 1.30), ("none", 1, 1.28), ("txl", 0, 1.17), ("txl", 1, 1.20),
                              ("linear", 0, 1.27), ("linear", 1, 1.31)):
        _seed_run(tmp_path / "runs", memory, seed, bpb, curve)
    _seed_run(tmp_path / "runs", "rmt", 0, 1.25, curve)
    _seed_run(tmp_path / "runs", "rmt", 1, 1.27, curve)
    for seed in (0, 1):  # RMT's step as one micro-batch of 16: the same recipe, in the same table
        path = tmp_path / "runs" / f"rmt-s{seed}" / "results.json"
        path.write_text(path.read_text().replace('"batch_size": 8, "grad_accum": 2', '"batch_size": 16, "grad_accum": 1'))
    _seed_run(tmp_path / "other", "none", 0, 2.0, curve)  # another recipe, one seed: not a seed table
    (tmp_path / "other" / "none-s0" / "results.json").write_text(
        (tmp_path / "other" / "none-s0" / "results.json").read_text().replace('"seq_len": 8192', '"seq_len": 4096'))
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("## Table 2 across seeds")[1].split("\n## ")[0]
    assert section.count("### python_code") == 1  # the one-seed recipe is left to the per-run table
    header = "| memory | seeds |"
    none, txl, linear = (cells(section, header, f"| {m} |") for m in ("none", "txl", "linear"))
    assert none["test bits/byte"] == "1.290 ± 0.010" and none["seeds"] == "0, 1"
    assert txl["bits/byte vs none"] == "lower by 0.105"  # 0.105 > 2 x 0.03, the larger range
    assert linear["bits/byte vs none"] == "within noise"  # 0.0 difference, range 0.04
    assert cells(section, header, "| rmt |")["test bits/byte"] == "1.260 ± 0.010"
    assert "rmt 16 x 1" in section and "none 8 x 2" in section
    assert (txl["first segment"], txl["segments 8-15"], txl["segments 16+"]) == ("1.000 ± 0.000", "0.900 ± 0.000",
                                                                               "0.800 ± 0.000")
    assert txl["paper PG19 / Arxiv-math"] == "11.88 / 2.42" and txl["train tokens/s"] == "918K"  # 700 x 16 x 8192 / 100 s
    assert (tmp_path / "docs" / "report_img" / "table2_seeds_1_segments.png").stat().st_size > 1000


def test_the_seed_table_draws_each_gated_memorys_final_gates_averaged_over_seeds(tmp_path):
    from infini_bench.report import final_gates, seed_groups

    curve = [1.0] * 16
    early, late = {"gates/L0/H0": 0.5, "gates/L0/H1": 0.5}, {"gates/L0/H0": 0.2, "gates/L0/H1": 0.9}
    _seed_run(tmp_path, "linear", 0, 1.3, curve, gates=[early, late])
    _seed_run(tmp_path, "linear", 1, 1.3, curve, gates=[early, {"gates/L0/H0": 0.4, "gates/L0/H1": 0.7}])
    _seed_run(tmp_path, "none", 0, 1.3, curve)
    _seed_run(tmp_path, "none", 1, 1.3, curve)
    runs = find_results([tmp_path])
    linear = seed_groups(runs)[next(iter(seed_groups(runs)))]["linear"]
    assert sorted(final_gates(r)[(0, 1)] for r in linear) == [0.7, 0.9]  # the last logged step, not the first
    text = build_report(runs, tmp_path / "docs" / "REPORT.md")
    assert "![seed table 1: gates of linear](report_img/table2_seeds_1_gates_linear.png)" in text
    assert (tmp_path / "docs" / "report_img" / "table2_seeds_1_gates_linear.png").stat().st_size > 1000
    assert "gates of none" not in text  # no gate, no figure


def test_gates_figure_spans_zero_to_one_and_names_its_run(tmp_path, monkeypatch):
    """A colour scale fitted to the values would paint 0.49 and 0.51 as the two extremes of the map."""
    import matplotlib.axes
    import torch

    from infini_bench.model import build_model
    from infini_bench.tracking import Run
    from tasks.common import log_gates

    seen = {}
    imshow, set_title = matplotlib.axes.Axes.imshow, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, *a, **k: seen.update(k) or imshow(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: seen.update(title=label) or set_title(self, label, *a, **k))
    model = build_model("tiny", memory="linear", n_layers=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.gate.uniform_(-0.04, 0.04)  # sigmoid within 0.49-0.51
    log_gates(model, Run(tmp_path, {"name": "tiny-linear"}, device="cpu"), step=7)
    assert (seen["vmin"], seen["vmax"]) == (0.0, 1.0)
    assert seen["title"] == "tiny-linear: sigmoid(beta) per layer and head, step 7"
    assert (tmp_path / "gates.png").stat().st_size > 1000


def _passkey_record(depths: list[str]) -> dict:
    """A passkey results.json with the needle at `depths` at 1K and 32K tokens: 100%, 50%, 0%, ... in turn."""
    grid = [{"length": n, "length_label": label, "depth": d, "acc": 1 - 0.5 * i, "n": 2}
            for n, label in ((1024, "1K"), (32768, "32K")) for i, d in enumerate(depths)]
    results = {f"passkey/acc@{r['length_label']}/{r['depth']}": r["acc"] for r in grid}
    results.update({"passkey/grid": grid, "passkey/acc": 0.5, "passkey/exact": 0.5, "train/steps": 10})
    return {"config": {"task": {"name": "passkey", "zero_shot": False}, "memory": {"name": "linear"},
                       "model": {"name": "tiny", "segment_len": 64}}, "results": results}


def test_the_passkey_table_names_the_depth_of_each_number(tmp_path):
    """The closing table's cells read 100/50/0: its rows say which depth each number is, and the paper's cell
    beside ours gives the paper's numbers for the same depths, in the same order."""
    table = results_table(_passkey_record(["start", "middle", "end"]), tmp_path)
    row = next(line for line in table.splitlines() if line.startswith(" acc@32K"))
    assert row.split("|")[0].strip() == "acc@32K % at start/middle/end"
    assert row.split("|")[1].strip() == "100/50/0" and "100/100/100 (paper, fine-tuned)" in row
    assert next(line for line in table.splitlines() if line.startswith(" acc@1K")).split("|")[2].strip() == ""
    two = results_table(_passkey_record(["end", "start"]), tmp_path)  # the paper's cells follow our depths
    row = next(line for line in two.splitlines() if line.startswith(" acc@32K"))
    assert row.split("|")[0].strip() == "acc@32K % at end/start" and "100/100 (paper, fine-tuned)" in row
    swept = results_table(_passkey_record(["0.00", "0.50", "1.00"]), tmp_path)  # task.depth_sweep=3
    row = next(line for line in swept.splitlines() if line.startswith(" acc@32K"))
    assert row.split("|")[0].strip() == "acc@32K % at depth 0.00/0.50/1.00"
    assert row.split("|")[1].strip() == "100/50/0"
    assert "100/100/100 at start/middle/end (paper, fine-tuned)" in row

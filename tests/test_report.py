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
from infini_bench.report import build_report
from infini_bench.report.runs import find_results
from infini_bench.report.tables import results_table

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
    from infini_bench.report.seeds import final_gates, seed_groups

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


def test_gates_over_training_average_the_seeds_at_the_steps_all_logged_and_skip_runs_logged_once(tmp_path):
    from infini_bench.report.seeds import gate_trajectory, seed_groups

    curve = [1.0] * 16
    _seed_run(tmp_path, "linear", 0, 1.3, curve, gates=[{"gates/L0/H0": 0.5, "gates/L0/H1": 0.3},
                                                          {"gates/L0/H0": 0.2, "gates/L0/H1": 0.9},
                                                          {"gates/L0/H0": 0.1, "gates/L0/H1": 0.8}])
    _seed_run(tmp_path, "linear", 1, 1.3, curve, gates=[{"gates/L0/H0": 0.5, "gates/L0/H1": 0.5},
                                                          {"gates/L0/H0": 0.4, "gates/L0/H1": 0.6}])
    _seed_run(tmp_path, "delta", 0, 1.3, curve, gates=[{"gates/L0/H0": 0.5, "gates/L0/H1": 0.5}])  # at the end only
    _seed_run(tmp_path, "none", 0, 1.3, curve)
    runs = find_results([tmp_path])
    by_arm = next(iter(seed_groups(runs).values()))
    steps, mean, widest, seeds = gate_trajectory(by_arm["linear"])
    assert steps == [10, 20] and seeds == 2  # step 30: one seed only
    assert mean == pytest.approx([(0.4 + 0.5) / 2, (0.55 + 0.5) / 2]) and widest == pytest.approx([0.5, 0.75])
    assert gate_trajectory(by_arm["delta"]) is None and gate_trajectory(by_arm["none"]) is None
    text = build_report(runs, tmp_path / "docs" / "REPORT.md")
    figure = "report_img/table2_seeds_1_gates_over_training.png"
    assert f"![seed table 1: gates over training]({figure})" in text
    assert (tmp_path / "docs" / figure).stat().st_size > 1000


def _arm(root: Path, memory: str, seed: int, bpb: float, curve: list[float], knobs: list[str],
         gates: list[dict[str, float]] = ()) -> None:
    """A seed run of one recipe with some of a memory's knobs turned on the command line, as Hydra records them."""
    _seed_run(root / "_".join(knobs), memory, seed, bpb, curve, gates)
    path = root / "_".join(knobs) / f"{memory}-s{seed}" / "results.json"
    data = json.loads(path.read_text())
    for knob in knobs:
        section, rest = knob.split(".", 1)
        key, value = rest.split("=")
        data["config"][section][key] = value if section == "memory" or not value.lstrip("-").replace(".", "").isdigit() \
            else float(value)
    data["config"]["hydra"] = {"overrides": ["experiment=table2_mini", f"memory={memory}", *knobs, f"seed={seed}"]}
    # Made after keys were added: one that moves only caches, two whose defaults do what older runs did, and the
    # tiny/paper choice named `scale` (where older runs have task.setting, model.scale and presets).
    data["config"]["cache_dir"] = "~/.cache/infini-bench"
    data["config"]["task"].update(window_start="any", limit=None)
    data["config"]["scale"] = "paper"
    path.write_text(json.dumps(data))


def test_ablation_arms_are_rows_of_their_recipes_seed_table_beside_their_memory(tmp_path):
    from infini_bench.report.seeds import arm, seed_groups

    flat, falling = [1.0] * 16 + [0.9] * 8, [1.0] * 16 + [0.7] * 8  # 16+ minus first: -0.1 and -0.3
    for seed, (a, b) in enumerate(((1.30, 1.28), (1.29, 1.31))):
        _seed_run(tmp_path, "none", seed, a, flat)
        _seed_run(tmp_path, "linear", seed, b, flat, gates=[{"gates/L0/H0": 0.3, "gates/L0/H1": 0.5}])
    _arm(tmp_path, "linear", 0, 1.50, flat, ["memory.read_norm=rms"])
    _arm(tmp_path, "linear", 1, 1.52, flat, ["memory.read_norm=rms"])
    _arm(tmp_path, "linear", 0, 1.29, falling, ["model.gate_init=-4"], gates=[{"gates/L0/H0": 0.02}])
    _arm(tmp_path, "linear", 1, 1.29, falling, ["model.gate_init=-4"], gates=[{"gates/L0/H0": 0.04}])
    for folder in (tmp_path / f"{m}-s{s}" for m in ("none", "linear") for s in (0, 1)):  # recorded with older keys
        data = json.loads((folder / "results.json").read_text())
        data["config"]["task"].update(setting="paper", presets={"paper": {"seq_len": 32768}})
        data["config"]["trainer"].update(setting="paper", presets={"paper": {"steps": 20000}})
        data["config"]["model"]["scale"] = "paper"
        (folder / "results.json").write_text(json.dumps(data))
    runs = find_results([tmp_path])
    assert len(seed_groups(runs)) == 1  # the gate's start is a knob, not another recipe; nor are the added keys
    labels = {arm(r) for r in runs}
    assert labels == {"none", "linear", "linear memory.read_norm=rms", "linear model.gate_init=-4"}
    text = build_report(runs, tmp_path / "docs" / "REPORT.md")
    section = text.split("## Table 2 across seeds")[1].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["memory", "none", "linear", "linear memory.read_norm=rms", "linear model.gate_init=-4"]
    header = "| memory | seeds |"
    linear = cells(section, header, "| linear |")
    norm = cells(section, header, "| linear memory.read_norm=rms |")
    init = cells(section, header, "| linear model.gate_init=-4 |")
    assert linear["test bits/byte"] == "1.295 ± 0.015"  # the arms' runs are not averaged into their memory's row
    assert norm["bits/byte vs the memory's own row"] == "higher by 0.215" and linear["bits/byte vs the memory's own row"] == "-"
    assert norm["bits/byte vs none"] == "higher by 0.215"  # none: 1.30 and 1.29
    assert init["16+ minus first"] == "-0.300 ± 0.000" and init["16+ minus first vs none"] == "lower by 0.200"
    assert init["segments 8-15 vs none"] == "within noise"
    assert linear["gates"] == "0.40 [0.30, 0.50]" and init["gates"] == "0.03 [0.02, 0.04]" and norm["gates"] == "-"
    assert "![seed table 1: gates of linear model.gate_init=-4](report_img/table2_seeds_1_gates_linear_model.gate_init--4.png)" in text
    assert (tmp_path / "docs" / "report_img" / "table2_seeds_1_vs_none.png").stat().st_size > 1000
    guide = next(line for line in section.splitlines() if "ABLATIONS.md" in line)
    link = guide.split("](")[1].rstrip(").")
    assert (tmp_path / "docs" / link).resolve().read_text().startswith("# Ablations")  # the link leads to the guide


def test_training_window_arms_join_their_recipes_seed_table_and_runs_without_the_key_read_as_packages(tmp_path):
    from infini_bench.report.seeds import arm, seed_groups

    curve = [1.0] * 16
    knobs = ["task.train_documents=file", "task.window_start=document", "task.min_doc_tokens=1"]
    for seed in (0, 1):
        _arm(tmp_path, "none", seed, 1.30, curve, [])  # recorded before task.train_documents existed
        _arm(tmp_path, "linear", seed, 1.35, curve, knobs)
        _arm(tmp_path, "none", seed, 1.31, curve, ["task.train_documents=file"])
    runs = find_results([tmp_path])
    assert len(seed_groups(runs)) == 1
    assert {arm(r) for r in runs} == {"none", "none task.train_documents=file", "linear task.min_doc_tokens=1 "
                                      "task.train_documents=file task.window_start=document"}
    for seed in (0, 1):  # not an arm's knob: another recipe
        _arm(tmp_path / "other", "none", seed, 1.3, curve, ["trainer.lr=0.1"])
    assert len(seed_groups(find_results([tmp_path]))) == 2


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


def _run_folder(root: Path, name: str, task: str, args: list[str], results: dict, recorded: bool = True) -> Path:
    """A run folder as run.py leaves it: results.json (with the overrides in its config when `recorded`, as
    today's runs have them) and .hydra/overrides.yaml."""
    config = {"task": {"name": task, "dataset": "embedded_pg19"}, "model": {"name": "tiny", "segment_len": 32}, "memory": {"name": "linear"},
              "seed": len(name)}  # a config of its own, so that no two folders merge
    choices = {"experiment": next((a.split("=")[1] for a in args if a.startswith("experiment=")), None)}
    if recorded:
        config["hydra"] = {"overrides": args, "choices": choices}
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\n" for a in args))
    (folder / "results.json").write_text(json.dumps({"config": config, "results": results}))
    return folder


@pytest.fixture
def three_runs(tmp_path):
    """Two LM runs (one a smoke run, one of an experiment, made before results.json recorded overrides) and a
    passkey run."""
    root = tmp_path / "outputs"
    _run_folder(root, "smoke", "lm", ["task=lm", "trainer.steps=2"],
                {"val/ppl": 9.5, "train/steps": 2, "val/loss_by_segment": [1.0, 2.0], "data/source": "embedded_pg19"})
    _run_folder(root, "mini/lm-linear", "lm", ["experiment=lm_cpu", "+model.arch.dim=64"],
                {"val/ppl": 7.25, "val/bpb": 1.5, "data/fallback": None}, recorded=False)
    _run_folder(root, "passkey", "passkey", ["task=passkey"], {"passkey/acc": 0.5, "passkey/grid": [{"acc": 0.5}]})
    return tmp_path


def report_main(args: list[str], monkeypatch) -> None:
    from infini_bench.report import main

    monkeypatch.setattr(sys, "argv", ["infini_bench.report", *args])
    main()


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_one_row_per_run_with_its_overrides_and_numeric_metrics(three_runs, monkeypatch):
    report_main([str(three_runs / "outputs"), "--csv", str(three_runs / "runs.csv")], monkeypatch)
    rows = read_csv(three_runs / "runs.csv")
    assert [r["path"] for r in rows] == [str(three_runs / "outputs" / p) for p in ("mini/lm-linear", "passkey", "smoke")]
    mini, passkey, smoke = rows
    assert list(mini)[:4] == ["path", "task", "model", "memory"] and mini["memory"] == "linear"
    # Overrides as columns, empty where a run did not set one; the old run's come from .hydra/overrides.yaml.
    assert (smoke["trainer.steps"], mini["trainer.steps"]) == ("2", "")
    assert (mini["experiment"], mini["model.arch.dim"], smoke["experiment"]) == ("lm_cpu", "64", "")
    # Numeric metrics as columns; lists, strings and None are left out.
    assert (float(smoke["val/ppl"]), float(mini["val/ppl"]), float(passkey["passkey/acc"])) == (9.5, 7.25, 0.5)
    assert mini["val/bpb"] == "1.5" and smoke["val/bpb"] == ""
    for key in ("val/loss_by_segment", "data/source", "data/fallback", "passkey/grid"):
        assert key not in mini


def test_filters_keep_runs_out_of_the_csv_and_the_report(three_runs, monkeypatch):
    root, csv_path, out = three_runs / "outputs", three_runs / "runs.csv", three_runs / "docs" / "REPORT.md"
    report_main([str(root), "--csv", str(csv_path), "--task", "lm"], monkeypatch)
    assert [r["path"].rsplit("outputs/", 1)[1] for r in read_csv(csv_path)] == ["mini/lm-linear", "smoke"]
    report_main([str(root), "--csv", str(csv_path), "--experiment", "lm_cpu"], monkeypatch)
    assert [r["path"].rsplit("outputs/", 1)[1] for r in read_csv(csv_path)] == ["mini/lm-linear"]
    report_main([str(root), "--csv", str(csv_path), "--only", "smo", "--only", "pass*"], monkeypatch)
    assert [r["path"].rsplit("outputs/", 1)[1] for r in read_csv(csv_path)] == ["passkey", "smoke"]
    report_main([str(root), "--out", str(out), "--only", "mini/*"], monkeypatch)
    text = out.read_text()
    assert "| 7.25 (embedded_pg19) |" in text and "9.50" not in text and "ours: zero-shot" not in text  # only the mini run


@pytest.mark.parametrize("args, line", [
    (["--task", "lmm"], "error: --task: 'lmm' is not one of booksum, lm, passkey"),
    (["--experiment", "nope"], "error: --experiment: 'nope' is not one of continual_1b, continual_8b, lm_cpu,"),
    (["--only", "nowhere"], "error: no run under "),
])
def test_a_bad_filter_is_one_line(args, line, three_runs, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        report_main([str(three_runs / "outputs"), "--csv", str(three_runs / "runs.csv"), *args], monkeypatch)
    assert stop.value.code == (1 if "--only" in args else 2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert not (three_runs / "runs.csv").exists()


def _curve_run(root: Path, name: str, dataset: str, model: str, args: list[str], params: int = 460_000) -> None:
    """An LM run's results.json with a loss-by-segment curve, and its training losses in metrics.jsonl."""
    values = dict(a.split("=") for a in args)
    config = {"seed": int(values.get("seed", 0)), "memory": {"name": values["memory"]},
              "model": {"name": model, "segment_len": 32}, "task": {"name": "lm", "dataset": dataset, "seq_len": 128},
              "hydra": {"overrides": ["task=lm", *args]}}
    results = {"val/ppl": 5.0, "val/bpb": 2.0, "val/loss_by_segment": [3.0, 2.5, 2.4], "model/params": params,
               "data/source": dataset}
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config, "results": results}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 4.0 - s}) + "\n" for s in (1, 2)))


def test_report_figures_give_each_memory_one_colour_and_each_data_set_and_scale_its_own_panel(
        tmp_path, monkeypatch, assert_labels_inside):
    from matplotlib.colors import to_hex

    from infini_bench import plots
    from infini_bench.memories import memory_names

    colours = {m: to_hex(plots.memory_color(m)) for m in memory_names()}
    assert len(set(colours.values())) == len(colours)  # one colour per registered memory, none shared
    runs = tmp_path / "runs"
    _curve_run(runs, "books/linear", "embedded_pg19", "tiny", ["memory=linear"])
    _curve_run(runs, "books/linear-s1", "embedded_pg19", "tiny", ["memory=linear", "seed=1"])
    _curve_run(runs, "books/none", "embedded_pg19", "tiny", ["memory=none"])
    _curve_run(runs, "books/rmt", "embedded_pg19", "tiny", ["memory=rmt"], params=462_000)  # its memory tokens
    _curve_run(runs, "code/delta", "python_code", "tiny", ["memory=delta"])  # delta before linear in this panel
    _curve_run(runs, "code/linear", "python_code", "tiny", ["memory=linear"])
    _curve_run(runs, "mini/delta", "embedded_pg19", "lm_mini", ["memory=delta", "model=lm_mini"], params=20_000_000)

    drawn = {}
    save = plots.save_figure

    def capture(fig, path):
        saved = save(fig, path)  # laid out and written
        assert_labels_inside(fig)
        drawn[Path(path).name] = {ax.get_title(): {line.get_label(): (to_hex(line.get_color()), line.get_linestyle())
                                                   for line in ax.get_lines()} for ax in fig.axes}
        return saved

    monkeypatch.setattr(plots, "save_figure", capture)
    build_report(find_results([runs]), tmp_path / "docs" / "REPORT.md")

    panels = drawn["loss_by_segment.png"]  # one panel per data set and model scale, lines named by what differs
    assert {title: sorted(lines) for title, lines in panels.items()} == {
        "embedded_pg19 (val): lm_mini (20M params), N=32": ["delta"],
        "embedded_pg19 (val): tiny (0.46M params), N=32": ["linear", "linear seed=1", "none", "rmt"],
        "python_code (val): tiny (0.46M params), N=32": ["delta", "linear"]}
    books = panels["embedded_pg19 (val): tiny (0.46M params), N=32"]
    assert books["linear"][1] != books["linear seed=1"][1]  # one colour, two line styles
    assert {"loss_by_segment.png", "lm_loss_curves.png", "table2_seeds_1_train.png"} <= set(drawn)
    for figure in drawn.values():  # every line in its memory's colour, whatever else the figure holds
        for lines in figure.values():
            for label, (colour, _) in lines.items():
                assert colour == colours[next(w for w in label.split() if w in colours)], (label, colour)

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


def test_a_line_plot_of_many_series_puts_its_legend_beside_the_axes(tmp_path, monkeypatch):
    """An ablation's dozen lines would hide under a legend drawn inside the axes."""
    import matplotlib.axes

    from infini_bench import plots

    seen, legend = {}, matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda ax, *a, **k: seen.update(k) or legend(ax, *a, **k))
    plots.line_plot({f"s{i}": [i, i + 1] for i in range(plots.LEGEND_INSIDE + 1)}, tmp_path / "many.png", "x", "y", "t")
    assert seen["bbox_to_anchor"][0] > 1
    seen.clear()
    plots.line_plot({"a": [1, 2], "b": [2, 3]}, tmp_path / "two.png", "x", "y", "t")
    assert "bbox_to_anchor" not in seen

"""Per-run report: our numbers under the paper's columns, merged reruns, the CSV, figures, results tables."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infini_bench.memories import memory_names
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
    for name in ("loss_by_segment", "rouge_by_length", "events_by_length", "lm_loss_curves", "passkey_loss_curves"):
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
    (["--experiment", "nope"], "error: --experiment: 'nope' is not one of booksum_gpu, booksum_gpu_base, booksum_gpu_short,"),
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


def test_a_line_plots_references_are_drawn_dotted_in_grey_at_their_own_lengths(tmp_path, monkeypatch):
    from infini_bench import plots

    drawn, save = {}, plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.update(
        {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
         for line in fig.axes[0].get_lines()}) or save(fig, path))
    plots.line_plot({"linear": [3.0, None]}, tmp_path / "a.png", "x", "y", "t", x={"linear": [512, 2048], "o": [512]},
                    references={"o": [4.2]})
    assert drawn["linear"][:2] == ([512, 2048], [3.0, pytest.approx(float("nan"), nan_ok=True)])
    assert drawn["o"] == ([512], [4.2], ":")


def test_the_rouge_figure_has_one_oracle_line_per_distinct_sweep():
    from infini_bench.report.figures import _oracles

    def run(lengths, oracle, n=128):
        results = {f"booksum/oracle_memory/overall@{k}": v for k, v in zip(("512", "2K"), oracle) if v is not None}
        return {"config": {"task": {"eval_input_lens": lengths}, "model": {"segment_len": n}}, "results": results}

    same = [run([512, 2048], [4.2, 11.3]), run([512, 2048], [4.2, 11.3])]  # two seeds of one recipe: one line
    assert _oracles(same) == {"oracle: perfect memory": ([512, 2048], [4.2, 11.3])}
    assert _oracles([run([512, 2048], [4.2, None])]) == {}  # a hub run (no events) or an older run: no oracle
    two = _oracles(same + [run([512, 2048], [7.0, 20.0], n=64)])
    assert two == {"oracle: perfect memory (1, N=128)": ([512, 2048], [4.2, 11.3]),
                   "oracle: perfect memory (2, N=64)": ([512, 2048], [7.0, 20.0])}


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


def test_recall_runs_get_their_own_table_in_memory_order_with_accuracy_by_gap_and_pairs(tmp_path):
    def recall_run(memory: str, seed: int, by_gap: dict[int, float], by_pairs: dict[int, float]) -> None:
        results = {"recall/acc": sum(by_gap.values()) / len(by_gap), "recall/chance": 1 / 1024,
                   **{f"recall/acc@gap={g}": a for g, a in by_gap.items()},
                   **{f"recall/acc@pairs={p}": a for p, a in by_pairs.items()},
                   **{f"recall/acc@pairs={p},gap={g}": a for p, a in by_pairs.items() for g in by_gap}}  # cells
        config = {"seed": seed, "name": f"tiny-{memory}", "memory": {"name": memory}, "model": {"name": "tiny"},
                  "task": {"name": "recall"}, "trainer": {"steps": 10}}
        folder = tmp_path / f"{memory}-s{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"config": config, "results": results}))

    assert "Associative recall" not in build_report([])  # no recall run, no section
    recall_run("txl", 0, {1: 0.001, 4: 0.0}, {8: 0.0005})
    recall_run("delta", 1, {1: 0.9, 4: 0.5}, {8: 0.7})
    recall_run("delta", 0, {1: 0.8, 4: 0.25}, {8: 0.525, 32: 0.4})
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("## Associative recall")[1].split("\n## ")[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(m.strip(), s.strip()) for m, s in rows] == [("memory", "seed"), ("delta", "0"), ("delta", "1"), ("txl", "0")]
    header = "| memory | seed |"
    first = cells(section, header, "| delta | 0 |")
    assert (first["accuracy"], first["gap 1"], first["gap 4"], first["8 pairs"], first["32 pairs"]) == \
        ("52.5", "80.0", "25.0", "52.5", "40.0")
    assert cells(section, header, "| delta | 1 |")["32 pairs"] == "-" and first["chance"] == "0.1"


def test_a_recall_run_ends_with_its_accuracy_beside_chance_then_by_gap_and_pairs_only(tmp_path):
    record = {"config": {"task": {"name": "recall"}, "model": {"name": "tiny", "segment_len": 64},
                         "memory": {"name": "delta"}},
              "results": {"recall/acc": 0.5, "recall/chance": 1 / 64, "recall/acc@gap=1": 0.75,
                          "recall/acc@pairs=8": 0.25, "recall/acc@segments_back=2-3": 0.4, "train/loss": 2.0,
                          "footprint/state_floats": 4224, "train/steps": 10}}
    table = results_table(record, tmp_path)
    rows = {line.split("|")[0].strip(): line.split("|")[1:] for line in table.splitlines() if "|" in line}
    assert [c.strip() for c in rows["recall/acc %"]] == ["50.0", "1.6 (chance)"]
    assert rows["recall/acc@gap=1 %"][0].strip() == "75.0" and rows["recall/acc@pairs=8 %"][0].strip() == "25.0"
    assert not any(k.startswith(("footprint", "train/loss", "recall/acc@segments_back")) for k in rows)


def _distance_run(root: Path, task: str, memory: str, seed: int, bins: list[tuple[int, int, float]] | None) -> None:
    """A passkey or recall run's results.json with accuracy by distance (lowest and highest segments back, accuracy
    per bin), or without it (None: a run made before the task recorded it)."""
    config = {"seed": seed, "name": f"tiny-{memory}", "memory": {"name": memory},
              "model": {"name": "tiny", "segment_len": 64}, "task": {"name": task}, "trainer": {"steps": 10}}
    results = {f"{task}/acc": 0.5, f"{task}/chance": 0.1, "train/steps": 10, "passkey/grid": []}
    if bins is not None:
        results[f"{task}/by_segments_back"] = [
            {"segments_back_min": lo, "segments_back_max": hi, "n": 4, "acc": acc, "exact": acc} if task == "passkey"
            else {"segments_back": str(lo) if lo == hi else f"{lo}-{hi}", "n": 4, "acc": acc} for lo, hi, acc in bins]
    folder = root / f"{task}-{memory}-s{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config, "results": results}))


def test_accuracy_by_distance_puts_every_memory_on_one_axis_with_seeds_averaged_per_bin(
        tmp_path, monkeypatch, assert_labels_inside):
    import math

    from infini_bench import plots

    runs, out = tmp_path / "runs", tmp_path / "docs" / "REPORT.md"
    _distance_run(runs, "passkey", "linear", 0, None)  # no rows: no figure
    _distance_run(runs, "recall", "delta", 0, None)
    text = build_report(find_results([runs]), out)
    assert "by_distance" not in text and not (out.parent / "report_img").exists()

    # linear's two seeds: 1.0 and 0.5 at 0, 0.5 and 0.0 at 8-15, one seed only at 2-3; none stops at 1.
    _distance_run(runs, "passkey", "linear", 1, [(0, 0, 1.0), (2, 3, 0.25), (8, 15, 0.5)])
    _distance_run(runs, "passkey", "linear", 2, [(0, 0, 0.5), (8, 15, 0.0)])
    _distance_run(runs, "passkey", "none", 0, [(0, 0, 0.75), (1, 1, 0.0)])
    _distance_run(runs, "recall", "delta", 1, [(1, 1, 0.9), (4, 7, 0.5)])
    drawn, save = {}, plots.save_figure

    def capture(fig, path):
        assert_labels_inside(fig)
        ax = fig.axes[0]
        drawn[Path(path).name] = ([t.get_text() for t in ax.get_xticklabels()],
                                  {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()})
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    text = build_report(find_results([runs]), out)
    ticks, lines = drawn["passkey_by_distance_1.png"]
    assert ticks == ["0", "1", "2-3", "4-7", "8-15"]  # 4-7 empty for all: still its own place
    nan = [None if math.isnan(y) else y for y in lines["linear (mean of 2 seeds)"]]
    assert nan == [75.0, None, 25.0, None, 25.0]  # the seeds' mean per bin; the unrecorded seed 0 is left out
    assert [None if math.isnan(y) else y for y in lines["none"]] == [75.0, 0.0, None, None, None]
    assert lines["chance"] == [10.0, 10.0]
    ticks, lines = drawn["recall_by_distance_1.png"]
    assert ticks == ["1", "2-3", "4-7"] and [y if y == y else None for y in lines["delta"]] == [90.0, None, 50.0]
    for task, title in (("passkey", "## Passkey retrieval"), ("recall", "## Associative recall")):
        section = text.split(title)[1].split("\n## ")[0]  # linked from the task's own section
        assert f"(report_img/{task}_by_distance_1.png)" in section and "mean of" in section
        assert (out.parent / "report_img" / f"{task}_by_distance_1.png").stat().st_size > 1000


def _booksum_run(root: Path, folder: str, memory: str, seed: int, overall: dict[int, float],
                 oracle: dict[str, dict[int, float]] | None = None, source: str = "synthetic") -> None:
    """A booksum run's results.json as the task writes it: overall ROUGE by input length, and for synthetic books
    the oracle rows at each length."""
    from infini_bench.paper import length_label

    results = {"booksum/overall": overall[max(overall)], "booksum/input_len": max(overall), "data/source": source,
               "train/steps": 10, **{f"booksum/overall@{length_label(n)}": v for n, v in overall.items()}}
    for key, values in (oracle or {}).items():
        results.update({f"booksum/{key}@{length_label(n)}": v for n, v in values.items()})
    config = {"seed": seed, "name": f"tiny-{memory}", "memory": {"name": memory},
              "model": {"name": "tiny", "segment_len": 128},
              "task": {"name": "booksum", "source": source, "eval_split": "validation", "seed": seed,
                       "train_input_len": 1024, "eval_input_lens": sorted(overall)},
              "trainer": {"steps": 10, "batch_size": 8, "grad_accum": 1, "seed": seed}}
    (root / folder).mkdir(parents=True)
    (root / folder / "results.json").write_text(json.dumps({"config": config, "results": results}))


def test_booksum_sweep_by_recipe_shows_the_oracle_rows_and_each_memory_over_seeds(tmp_path):
    oracle = {"oracle_memory/overall": {512: 4.2, 2048: 11.3}, "oracle_local/overall": {512: 0.0, 2048: 1.4},
              "events_beyond_window": {512: 0.023, 2048: 0.0625}}
    _booksum_run(tmp_path, "syn/linear-s1", "linear", 1, {512: 5.0, 2048: 9.0}, oracle)
    _booksum_run(tmp_path, "syn/linear-s0", "linear", 0, {512: 3.0, 2048: 8.0}, oracle)
    _booksum_run(tmp_path, "syn/none-s0", "none", 0, {512: 2.5, 2048: 2.0}, oracle)
    _booksum_run(tmp_path, "hub/linear-s0", "linear", 0, {512: 20.0}, source="hub")  # one seed, no oracle: no table
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("### Summary quality against input length by recipe")[1].split("\n## ")[0]
    assert section.count("\n#### ") == 1 and "#### synthetic books (validation)" in section
    assert "#### synthetic books (validation): tiny, 8 x 128 tokens, 10 steps" in section  # every run: 10 steps
    header = "| row | seeds |"
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["row", "oracle: perfect memory (every event read)",
                    "oracle: local attention alone (events in the last segment)",
                    "events beyond the window (share of the book's events)", "none", "linear"]
    memory = cells(section, header, "| oracle: perfect memory")
    assert (memory["512"], memory["2K"]) == ("4.2", "11.3")
    assert cells(section, header, "| oracle: local")["2K"] == "1.4"
    beyond = cells(section, header, "| events beyond")
    assert (beyond["512"], beyond["2K"]) == ("0.02", "0.06")
    linear = cells(section, header, "| linear |")  # seeds 0 and 1: 3.0 and 5.0, 8.0 and 9.0
    assert (linear["seeds"], linear["512"], linear["2K"]) == ("0, 1", "4.0 ± 1.0", "8.5 ± 0.5")
    assert linear["runs"] == "[s0](../syn/linear-s0), [s1](../syn/linear-s1)"
    none = cells(section, header, "| none |")
    assert (none["seeds"], none["512"], none["2K"]) == ("0", "2.5", "2.0")
    assert "guess" not in section and "word for word" not in section  # runs scored before these were counted
    steps = json.loads((tmp_path / "syn/none-s0" / "results.json").read_text())
    steps["results"]["train/steps"] = 40  # an equal time budget: memories train different numbers of steps
    (tmp_path / "syn/none-s0" / "results.json").write_text(json.dumps(steps))
    # The guess row and the events stated word for word, where the runs have them.
    for folder, recalled in (("syn/linear-s1", {512: 0.0, 2048: 0.25}), ("syn/linear-s0", {512: 0.0, 2048: 0.75}),
                             ("syn/none-s0", {512: 0.0, 2048: 0.0})):
        saved = json.loads((tmp_path / folder / "results.json").read_text())
        saved["results"].update({"booksum/guess/overall": 49.3, "booksum/events_in_input@512": 0.02,
                                 "booksum/events_in_input@2K": 0.125,
                                 **{f"booksum/events_recalled@{k}": v for k, v in zip(("512", "2K"), recalled.values())}})
        (tmp_path / folder / "results.json").write_text(json.dumps(saved))
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("### Summary quality against input length by recipe")[1].split("\n## ")[0]
    assert "tiny, 8 x 128 tokens, 10-40 steps" in section
    guess = cells(section, header, "| guess:")
    assert (guess["512"], guess["2K"]) == ("49.3", "49.3")
    words = section.split("word for word")[1]
    assert cells(words, header, "| oracle: events wholly")["2K"] == "0.12"
    assert cells(words, header, "| linear |")["2K"] == "0.50 ± 0.25" and cells(words, header, "| none |")["512"] == "0.00"
    # A hub recipe with two seeds gets its table too, with no oracle rows.
    _booksum_run(tmp_path, "hub/linear-s1", "linear", 1, {512: 21.0}, source="hub")
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    hub = text.split("#### hub books (validation)")[1].split("\n#### ")[0].split("\n## ")[0]
    assert cells(hub, header, "| linear |")["512"] == "20.5 ± 0.5" and "oracle" not in hub


def test_a_booksum_run_recorded_before_a_synthetic_key_existed_is_a_seed_of_the_same_recipe(tmp_path):
    # task.synthetic.train_cut_min came after seed 0 was run; its default (None: whole books) is what seed 0 did.
    for seed, overall in ((0, {512: 3.0}), (1, {512: 5.0})):
        _booksum_run(tmp_path, f"syn/linear-s{seed}", "linear", seed, overall)
        path = tmp_path / f"syn/linear-s{seed}" / "results.json"
        data = json.loads(path.read_text())
        data["config"]["task"]["synthetic"] = {"book_chars": 400, "n_events": 2, **({"train_cut_min": None} if seed else {})}
        path.write_text(json.dumps(data))
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("### Summary quality against input length by recipe")[1].split("\n## ")[0]
    assert section.count("\n#### ") == 1
    assert cells(section, "| row | seeds |", "| linear |")["512"] == "4.0 ± 1.0"


def test_each_booksum_recipe_names_the_overrides_all_its_runs_share(tmp_path):
    # Two recipes alike but for one override: their headings match, so each says what its runs were run with.
    for folder, extra in (("plain", []), ("shift", ["+model.arch.token_shift=true"])):
        for seed in (0, 1):
            _booksum_run(tmp_path, f"{folder}/none-s{seed}", "none", seed, {512: 3.0 + seed})
            path = tmp_path / f"{folder}/none-s{seed}" / "results.json"
            data = json.loads(path.read_text())
            data["config"]["model"]["arch"] = {"token_shift": bool(extra)}
            data["config"]["hydra"] = {"overrides": ["experiment=booksum_gpu", "model.init_from=base.safetensors", *extra,
                                                     "memory=none", f"seed={seed}", "logger=none",
                                                     f"hydra.run.dir=/tmp/{folder}{seed}"]}
            path.write_text(json.dumps(data))
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("### Summary quality against input length by recipe")[1].split("\n## ")[0]
    shared = [line for line in section.splitlines() if line.startswith("Every run: ")]
    assert sorted(shared) == ["Every run: `experiment=booksum_gpu model.init_from=base.safetensors "
                              "+model.arch.token_shift=true`, with its memory and seed.",
                              "Every run: `experiment=booksum_gpu model.init_from=base.safetensors`, with its memory "
                              "and seed."]


def test_the_booksum_recipe_table_gives_rouge_1_2_and_l_by_length_as_seed_means(tmp_path):
    for seed, (r1, r2, rl) in enumerate(((40.0, 20.0, 30.0), (44.0, 22.0, 34.0))):
        _booksum_run(tmp_path, f"syn/linear-s{seed}", "linear", seed, {512: 3.0, 2048: 8.0})
        path = tmp_path / f"syn/linear-s{seed}" / "results.json"
        data = json.loads(path.read_text())
        data["results"].update({"booksum/rouge1@2K": r1, "booksum/rouge2@2K": r2, "booksum/rougeL@2K": rl})
        path.write_text(json.dumps(data))
    text = build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    section = text.split("### Summary quality against input length by recipe")[1].split("\n## ")[0]
    parts = section.split("ROUGE-1 / ROUGE-2 / ROUGE-L")[1]
    row = cells(parts, "| row | seeds |", "| linear |")
    assert (row["512"], row["2K"]) == ("-", "42.0 / 21.0 / 32.0")


def test_booksum_figures_draw_each_memory_as_its_mean_over_seeds(tmp_path):
    from infini_bench.report.figures import _label, _seed_means

    oracle = {"oracle_memory/overall": {512: 4.2, 2048: 11.3}, "events_in_input": {512: 0.02, 2048: 0.125}}
    _booksum_run(tmp_path, "syn/linear-s0", "linear", 0, {512: 3.0, 2048: 8.0},
                 {**oracle, "events_recalled": {512: 0.0, 2048: 0.5}})
    _booksum_run(tmp_path, "syn/linear-s1", "linear", 1, {512: 5.0, 2048: 9.0},
                 {**oracle, "events_recalled": {512: 0.0, 2048: 0.25}})
    runs = find_results([tmp_path])
    xs = {_label(r): [512, 2048] for r in runs}
    assert _seed_means(runs, xs, "booksum/overall") == {"tiny linear N=128": [4.0, 8.5]}
    assert _seed_means(runs, xs, "booksum/events_recalled") == {"tiny linear N=128": [0.0, 0.375]}
    build_report(runs, tmp_path / "docs" / "REPORT.md")
    assert (tmp_path / "docs" / "report_img" / "events_by_length.png").stat().st_size > 1000


def test_booksum_figures_keep_recipes_that_share_a_model_memory_and_segment_apart(tmp_path, monkeypatch):
    # Two recipes of tiny at N=128, one with the token shift (and delta): a line per recipe and memory.
    from infini_bench import plots

    for folder, extra, base, memories in (("plain", [], 3.0, ["none"]),
                                          ("shift", ["+model.arch.token_shift=true"], 7.0, ["none", "delta"])):
        for seed, memory in ((s, m) for s in (0, 1) for m in memories):
            _booksum_run(tmp_path, f"{folder}/{memory}-s{seed}", memory, seed, {512: base + seed, 2048: base})
            path = tmp_path / f"{folder}/{memory}-s{seed}" / "results.json"
            data = json.loads(path.read_text())
            data["config"]["model"]["arch"] = {"token_shift": bool(extra)}
            data["config"]["hydra"] = {"overrides": ["experiment=booksum_gpu", f"model.init_from={folder}.safetensors",
                                                     *extra, f"memory={memory}", f"seed={seed}"]}
            path.write_text(json.dumps(data))
    drawn, save = {}, plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.setdefault(Path(path).name, {
        line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}) and save(fig, path))
    build_report(find_results([tmp_path]), tmp_path / "docs" / "REPORT.md")
    lines = drawn["rouge_by_length.png"]
    assert lines["tiny none N=128"] == [3.5, 3.0]
    assert lines["paper: 8B on BookSum, about 17 at 16K to 20 at 500K (ends only)"] == [17.0, 20.0]  # beside ours
    assert lines["tiny none N=128 (+model.arch.token_shift=true)"] == [7.5, 7.0]
    # a memory only the second recipe ran is still named by it
    assert lines["tiny delta N=128 (+model.arch.token_shift=true)"] == [7.5, 7.0] and "tiny delta N=128" not in lines


def test_distance_figure_tick_labels_never_touch_and_its_title_gives_the_range_of_steps(tmp_path, monkeypatch):
    """Seven memories put the legend beside the axes; eight bins up to 64-127 must still read one by one."""
    from infini_bench import plots

    runs, out = tmp_path / "runs", tmp_path / "docs" / "REPORT.md"
    bins = [(1, 1, 0.9), (2, 3, 0.8), (4, 7, 0.7), (8, 15, 0.6), (16, 31, 0.5), (32, 63, 0.4), (64, 127, 0.3)]
    steps = {m: 1000 + 100 * i for i, m in enumerate(memory_names())}
    for memory, n in steps.items():
        for seed in (0, 1):  # legend entries as long as a grid's: "... (mean of 2 seeds)"
            _distance_run(runs, "recall", memory, seed, bins)
            path = runs / f"recall-{memory}-s{seed}" / "results.json"
            record = json.loads(path.read_text())
            record["results"]["train/steps"] = n
            path.write_text(json.dumps(record))
    boxes, titles, save = {}, {}, plots.save_figure

    def capture(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes[Path(path).name] = ([t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()], fig.dpi)
        titles[Path(path).name] = fig.axes[0].get_title()
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    build_report(find_results([runs]), out)
    ticks, dpi = boxes["recall_by_distance_1.png"]
    assert len(ticks) == len(bins)
    assert all(b.x0 - a.x1 >= 0.1 * dpi for a, b in zip(ticks, ticks[1:]))  # a tenth of an inch apart at least
    assert f"{min(steps.values())}-{max(steps.values())} steps" in titles["recall_by_distance_1.png"]


def test_recall_capacity_figure_draws_each_memory_at_its_seeds_mean_beside_copying(tmp_path, monkeypatch):
    from infini_bench import plots

    runs, out = tmp_path / "runs", tmp_path / "docs" / "REPORT.md"
    by_seed = {("linear", 0): (0.9, 0.5), ("linear", 1): (0.7, 0.3), ("none", 0): (0.002, 0.001)}
    for (memory, seed), (at8, at32) in by_seed.items():
        _distance_run(runs, "recall", memory, seed, [(1, 1, 0.5)])
        path = runs / f"recall-{memory}-s{seed}" / "results.json"
        record = json.loads(path.read_text())
        record["results"].update({"recall/acc@pairs=8": at8, "recall/acc@pairs=32": at32,
                                  "recall/acc@pairs=8,gap=1": 0.0})  # a cell: not a point of the figure
        path.write_text(json.dumps(record))
    drawn, save = {}, plots.save_figure

    def capture(fig, path):
        ax = fig.axes[0]
        drawn[Path(path).name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                  for line in ax.get_lines()}
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", capture)
    text = build_report(find_results([runs]), out)
    lines = drawn["recall_by_pairs_1.png"]
    xs, ys = lines["linear (mean of 2 seeds)"]
    assert xs == [8, 32] and ys == pytest.approx([80.0, 40.0])
    assert lines["none"][1] == pytest.approx([0.2, 0.1])
    assert lines["copying: 1 / pairs"][1] == pytest.approx([12.5, 3.125])
    assert lines["chance: 1 / vocab"][1] == pytest.approx([10.0, 10.0])
    section = text.split("## Associative recall")[1].split("\n## ")[0]
    assert "(report_img/recall_by_pairs_1.png)" in section


def test_table3_reads_a_depth_sweep_at_its_start_middle_and_end():
    """experiment=passkey_gpu sweeps five depths (0, 0.25, 0.5, 0.75, 1), named by value: the paper's three
    columns take the rows at 0, 0.5 and 1."""
    from infini_bench.report.tables import table3

    grid = [{"length": 32768, "length_label": "32K", "depth": f"{d:.2f}", "depth_value": d, "acc": acc}
            for d, acc in ((0.0, 0.11), (0.25, 0.9), (0.5, 0.22), (0.75, 0.9), (1.0, 0.33))]
    run = {"path": "runs/pk", "config": {"task": {"name": "passkey"}, "model": {"name": "tiny", "segment_len": 256},
                                         "memory": {"name": "linear"}},
           "results": {"passkey/grid": grid, "train/steps": 900, "passkey/exact": 0.0, "passkey/chance": 0.125}}
    row = next(line for line in table3([run]) if line.startswith("| ours"))
    assert row.split(" | ")[1] == "11/22/33"


def test_a_recipes_runs_stay_one_setting_across_their_seeds_bases_and_evaluation_extent():
    """make passkey-grid's runs: each seed starts from its own base (model.init_from), full attention is evaluated on
    fewer lengths and Memorizing in smaller batches. They are still one recipe, drawn on one axis; a training
    knob (the training prompt lengths) is another recipe."""
    from infini_bench.report.seeds import by_setting

    def run(memory: str, seed: int, **task) -> dict:
        config = {"seed": seed, "name": f"tiny-{memory}", "memory": {"name": memory},
                  "model": {"name": "tiny", "segment_len": 256, "init_from": f"base/s{seed}/model.safetensors"},
                  "task": {"name": "passkey", "lengths": [2048, 1048576], "eval_batch": 20,
                           "train_lengths": [512, 1024], **task}, "trainer": {"seed": seed, "steps": 10},
                  "hydra": {"overrides": [f"memory={memory}", f"seed={seed}"]}}
        return {"config": config, "results": {}, "path": "."}

    grid = [run("linear", 0), run("linear", 1), run("full", 0, lengths=[2048, 32768]),
            run("memorizing", 1, eval_batch=10)]
    groups = by_setting(grid)
    assert len(groups) == 1 and sorted(next(iter(groups.values()))) == ["full", "linear", "memorizing"]
    assert len(by_setting([*grid, run("linear", 0, train_lengths=[300, 600])])) == 2

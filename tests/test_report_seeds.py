"""Table 2 across seeds: mean and range per memory, gates averaged over seeds, ablation arms as rows."""
import json
from pathlib import Path

import pytest

from infini_bench.report import build_report
from infini_bench.report.runs import find_results
from test_report import cells


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

"""The report puts run results next to the paper's numbers."""
import json

from infini_bench.report import build_report, find_results


def test_report_places_runs_beside_the_paper(tmp_path):
    run = tmp_path / "outputs" / "lm" / "a"
    run.mkdir(parents=True)
    config = {"task": {"name": "lm", "dataset": "pg19", "seq_len": 32768}, "memory": {"name": "delta"},
              "model": {"name": "lm_paper", "segment_len": 2048}}
    (run / "results.json").write_text(json.dumps({"config": config, "results": {
        "test/ppl": 10.5, "test/bpb": 1.1, "train/steps": 20000, "data/source": "pg19"}}))
    passkey = tmp_path / "outputs" / "passkey" / "b"
    passkey.mkdir(parents=True)
    grid = [{"length": 32768, "length_label": "32K", "depth": d, "acc": a}
            for d, a in (("start", 1.0), ("middle", 0.5), ("end", 0.25))]
    (passkey / "results.json").write_text(json.dumps({"config": {
        "task": {"name": "passkey", "zero_shot": True}, "memory": {"name": "linear"}, "model": {"name": "1b"}},
        "results": {"passkey/grid": grid, "train/steps": 0, "passkey/acc/earlier_segment": 0.5}}))
    text = build_report(find_results([tmp_path / "outputs"]))
    lm_row = next(line for line in text.splitlines() if line.startswith("| `a`"))
    assert "| pg19 (test) | lm_paper | delta | 16 x 2048 | 20000 | 10.50 | 1.10 | 9.67 |" in lm_row
    assert "| ours: 1b linear zero-shot (lengths 32K) | 100.00/50.00/25.00 |" in text
    assert "needle in an earlier segment: 50.00%" in text
    assert "| paper: fine-tuned delta | 100/100/100 | 100/100/99 |" in text

"""The report puts run results next to the paper's numbers."""
import json

from infini_bench.paper import TABLE2, TABLE2_RULE, TABLE3, TABLE3_LENGTHS
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
    lm = table(text, "## Long-context language modelling")
    ours = lm["`a`"]
    assert (ours["data"], ours["model"], ours["memory"], ours["steps"]) == ("pg19 (test)", "lm_paper", "delta", "20000")
    assert float(ours["perplexity"]) == 10.5 and float(ours["bits/byte"]) == 1.1
    assert float(ours["paper"]) == TABLE2[TABLE2_RULE["delta"]]["pg19"]  # the paper's number for the same rule
    for name, numbers in TABLE2.items():  # every paper row, as the paper gives it
        assert lm[f"paper: {name}"]["perplexity"] == f"{numbers['pg19']} / {numbers['arxiv_math']}"
    passkey = table(text, "## Passkey retrieval")
    ours = passkey["ours: 1b linear zero-shot (lengths 32K)"]
    assert [float(x) for x in ours["32K"].split("/")] == [100.0, 50.0, 25.0]  # start / middle / end, in %
    fine_delta = passkey["paper: fine-tuned delta"]
    assert [fine_delta[n] for n in TABLE3_LENGTHS] == ["/".join(map(str, r)) for r in TABLE3[("fine-tuned", "delta")]]
    assert "needle in an earlier segment: 50.00%" in text


def table(text: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under `heading`, as {first cell: {column: cell}}."""
    lines = text.split(heading, 1)[1].splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = rows[0], [r for r in rows[2:] if r[0]]
    return {r[0]: dict(zip(header, r)) for r in body}

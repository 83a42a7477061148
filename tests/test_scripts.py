"""The measurement scripts run end to end on CPU: scripts/fsdp_bench.py (2 gloo ranks) and scripts/passkey_scale.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_model

from infini_bench.model import build_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_fsdp_bench_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "fsdp_bench.py"), "--runs", "tiny:256:2", "--segment-len", "64", "--steps", "2",
           "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["world_size"] == 2 and row["world_size"] == 2 and row.get("error") is None
    assert row["params"] == sum(p.numel() for p in build_model("tiny").parameters())
    # tokens/s per GPU is this rank's batch over the measured step time
    assert row["tokens_per_s_per_gpu"] * row["step_s"] == pytest.approx(2 * 256, rel=1e-6)
    assert abs(row["loss"] - math.log(259)) < 0.3  # random init on random tokens: about ln(vocab)


def test_passkey_scale_streams_each_length(tmp_path):
    save_model(build_model("tiny", segment_len=64), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "passkey_scale.py"), "--lengths", "256,512", "--samples", "1",
           "--key-range", "1,9", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["length"] for r in data["rows"]] == [256, 512] and data["key_range"] == [1, 9]
    for r in data["rows"]:
        assert r["samples"] == 3 and 0.0 <= r["acc"] <= 1.0 and r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["length"] * 3 / r["seconds"])
    assert "| 512 | 3 |" in proc.stdout  # the markdown table
    wrong = build_model("tiny", segment_len=64, dim=64)
    save_model(wrong, str(tmp_path / "wrong.safetensors"))
    cmd[cmd.index(str(tmp_path / "tiny.safetensors"))] = str(tmp_path / "wrong.safetensors")
    assert subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240).returncode != 0


def test_gpu_smoke_runs_on_the_cpu_and_times_the_steady_steps(tmp_path):
    """scripts/gpu_smoke.py's checks on the CPU (tracing only), and its step time ignores a one-off slow step."""
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu", "--backend", "eager",
           "--memories", "none,linear", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["memory"] for r in rows] == ["none", "linear"] and all(r["ok"] for r in rows)
    for r in rows:
        assert len(r["steps_ms"]) == len(r["losses"]) == 4
        assert r["first_step_s"] * 1e3 == pytest.approx(r["steps_ms"][0])
        later = sorted(r["steps_ms"][1:])
        assert r["step_ms"] == pytest.approx(later[1])  # the median of the three after the first
        assert r["stream_rel_err"] < 1e-4  # fp32 on the CPU: streamed and whole-sequence logits agree

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_smoke import steady_ms
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert steady_ms([30.0, 0.01, 4.4, 0.012]) == pytest.approx(12.0)  # a compile in the second step: ignored
    assert steady_ms([2.0]) == pytest.approx(2000.0)


def _compare_curves():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import compare_curves
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return compare_curves


def test_compare_curves_averages_training_metrics_and_refuses_a_missing_key(tmp_path):
    """scripts/compare_curves.py: block means against a plain loop, evaluations unsmoothed, one PNG, and one-line
    errors (no PNG) for a folder without metrics.jsonl and a key no run logged."""
    cc = _compare_curves()
    losses = [7.0, 6.0, 5.5, 5.0, 3.0, 1.0, 2.0]
    rows = [{"step": 10 * (i + 1), "train/loss": x} for i, x in enumerate(losses)]
    rows += [{"step": 35, "recall/val_acc@pairs=8,gap=1": 0.25}, {"step": 70, "recall/val_acc@pairs=8,gap=1": 0.5}]
    steps, values = cc.curve(rows, "train/loss", 3)
    assert steps == [30, 60, 70]
    assert values == pytest.approx([(7.0 + 6.0 + 5.5) / 3, (5.0 + 3.0 + 1.0) / 3, 2.0])
    assert cc.curve(rows, "train/loss", 1) == ([10 * (i + 1) for i in range(7)], losses)
    run = tmp_path / "experiment=x,memory=full"  # a Hydra folder name: "=" inside, still a folder
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cc.main([str(tmp_path / "c.png"), str(run), f"other={run}", "--key", "train/loss",
                   "--key", "recall/val_acc@pairs=8,gap=1", "--smooth", "3"])
    assert out.is_file() and out.stat().st_size > 0
    for argv, words in (([str(tmp_path / "d.png"), str(tmp_path)], "no metrics.jsonl"),
                        ([str(tmp_path / "d.png"), str(run), "--key", "val/ppl"], "no run logged 'val/ppl'"),
                        ([str(tmp_path / "d.png"), str(run), "--smooth", "0"], "--smooth")):
        with pytest.raises(SystemExit) as e:
            cc.main(argv)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "d.png").exists()

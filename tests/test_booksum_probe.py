"""scripts/booksum_memory_probe.py: which summary tokens need the memory, and the loss with it carried and wiped."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from infini_bench.compressive import memory_read, memory_write
from tasks.runner import build_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from booksum_memory_probe import event_focus, kernel_weights, key_sums, load_run, main, probe, token_classes  # noqa: E402


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=booksum", "logger=none", "model.segment_len=32",
                                            "task.eval_books=2", "task.synthetic.book_chars=150",
                                            "task.synthetic.n_events=2", "task.train_input_len=256",
                                            "task.summary_max_tokens=64", *overrides])


def test_each_summary_token_is_classed_by_where_its_event_lies():
    # Segments of 32, the book after one prefix token. Event 0 at book tokens 0-2 (segment 0), event 1 at 28-35
    # (positions 29-36: across the boundary), event 2 at 40-42 (segment 1). The summary's token j is predicted
    # from position 49 + j: segment 1 throughout.
    got = token_classes([(0, 3), (28, 36), (40, 43)], [(0, 3), (4, 8), (9, 12)], first_summary=50, n_summary=12,
                        offset=1, segment_len=32)
    assert got == ["memory"] * 3 + ["other"] + ["split"] * 4 + ["other"] + ["local"] * 3 + ["other"]
    # An event cut out of the book has no span: its tokens are in no event's class.
    got = token_classes([(0, 3), None, (40, 43)], [(0, 3), (4, 8), (9, 12)], 50, 12, 1, 32)
    assert got[4:8] == ["other"] * 4 and got[:3] == ["memory"] * 3
    # Segments of 8: the summary (positions 49-61) lies three or more segments after every event.
    assert set(token_classes([(0, 3), (28, 36), (40, 43)], [(0, 3), (4, 8), (9, 12)], 50, 12, 1, 8)) == \
        {"memory", "other"}


@pytest.mark.parametrize("memory", ["none", "linear"])
def test_wiping_changes_nothing_without_a_memory_and_the_memory_class_with_one(memory):
    cfg = config(f"memory={memory}")
    model, tokenizer = build_model_and_tokenizer(cfg)
    got, focus = probe(cfg, model.eval(), tokenizer)
    assert (focus is None) == (memory == "none")
    if focus is not None:  # one weight per layer and head, each a ratio of shares
        assert len(focus) == model.cfg.n_layers and all(len(f) == model.cfg.n_heads and min(f) > 0 for f in focus)
    assert got["memory"]["tokens"] > 0 and sum(c["tokens"] for c in got.values()) > got["memory"]["tokens"]
    for c, row in got.items():
        if not row["tokens"]:
            continue
        if memory == "none":  # nothing crosses a segment boundary: the same logits either way
            assert row["loss_carried"] == row["loss_wiped"] and row["acc_carried"] == row["acc_wiped"], c
    if memory == "linear":  # a random gate of 0.5 mixes in what the memory returns
        assert abs(got["memory"]["loss_carried"] - got["memory"]["loss_wiped"]) > 1e-4


def fake_run(folder: Path, cfg):
    """A run folder as a finished run leaves it, for the probe: the config in results.json and the weights."""
    model, tokenizer = build_model_and_tokenizer(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.embed.weight:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"))
    (folder / "results.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
    return model, tokenizer


def test_the_script_reads_a_run_folder_and_refuses_another_task(tmp_path, capsys):
    cfg = config("memory=linear")
    model, tokenizer = fake_run(tmp_path, cfg)
    assert main([str(tmp_path), "--out", str(tmp_path / "probe.json")]) == 0
    saved = json.loads((tmp_path / "probe.json").read_text())[str(tmp_path)]
    assert saved["memory"] == "linear" and saved["segment_len"] == 32
    direct, focus = probe(cfg, model.eval(), tokenizer)  # the weights the run folder holds: the same numbers
    assert [row for layer in saved["read_focus"] for row in layer] == \
        pytest.approx([row for layer in focus for row in layer], rel=1e-5)
    assert {c: row["tokens"] for c, row in saved["classes"].items()} == {c: row["tokens"] for c, row in direct.items()}
    assert saved["classes"]["memory"]["loss_wiped"] == pytest.approx(direct["memory"]["loss_wiped"], rel=1e-5)
    assert saved["classes"]["memory"]["loss_carried"] == pytest.approx(direct["memory"]["loss_carried"], rel=1e-5)
    assert "memory" in capsys.readouterr().out
    other = OmegaConf.to_container(config("memory=linear", "task.truncate=tail"), resolve=True)
    (tmp_path / "results.json").write_text(json.dumps({"config": other}))
    with pytest.raises(SystemExit, match="cut at the head"):
        load_run(tmp_path)


def test_the_kernel_weights_give_the_linear_memorys_read():
    # Eq. 7 computed by the memory's own write and read, against the weighted sum of the values it was written.
    g = torch.Generator().manual_seed(0)
    h, hk, p, d = 4, 2, 37, 8
    q, k, v = torch.randn(h, d, generator=g), torch.randn(hk, p, d, generator=g), torch.randn(hk, p, d, generator=g)
    w = kernel_weights(q, k)
    assert w.shape == (h, p) and torch.allclose(w.sum(-1), torch.ones(h)) and (w > 0).all()
    by_weights = torch.einsum("hp,hpd->hd", w, v.repeat_interleave(h // hk, dim=0))
    state = memory_write(k[None], v[None], "linear", None)
    read = memory_read(q[None, :, None], state)[0, :, 0]
    assert torch.allclose(by_weights, read, atol=1e-5)


def test_make_booksum_grid_probes_the_runs_that_finished(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "booksum-grid", f"MINI={tmp_path}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "booksum_memory_probe.py" in x)
    fake_run(tmp_path / "booksum_gpu" / "none-s0", config("memory=none"))
    (tmp_path / "booksum_gpu" / "linear-s0").mkdir()  # cut short: no weights, left out
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "booksum_gpu" / "probe.json").read_text())
    assert [Path(k).name for k in saved] == ["none-s0"] and saved[next(iter(saved))]["memory"] == "none"


def test_the_read_focus_is_one_for_equal_keys_and_the_ceiling_for_keys_on_the_event_alone():
    # One layer, two query heads on one kv head, 10 tokens written, the event at tokens 4-5, read at position 12.
    t, written = 13, 10
    q = torch.zeros(2, t, 2)
    q[:, 12] = torch.tensor([3.0, -30.0])
    equal = torch.zeros(1, t, 2)
    assert event_focus([q], key_sums([equal]), 12, 4, 6, written) == pytest.approx(torch.ones(1, 2))
    # Keys that sigma maps to ~0 in the query's direction except on the event: the read is the event's alone.
    alone = torch.full((1, t, 2), -30.0)
    alone[0, 4:6] = torch.tensor([2.0, 0.0])
    got = event_focus([q], key_sums([alone]), 12, 4, 6, written)
    assert got == pytest.approx(torch.full((1, 2), written / 2), rel=1e-6)
    assert event_focus([q], key_sums([alone]), 12, 5, 7, written) == pytest.approx(torch.full((1, 2), written / 4), rel=1e-6)


def test_the_read_focus_from_running_key_sums_is_the_kernel_weights_summed_over_the_event():
    # Two layers, four query heads on two kv heads: the two-lookup focus against the weights of every token written.
    torch.manual_seed(0)
    t = 40
    qs, ks = [torch.randn(4, t, 8) for _ in range(2)], [torch.randn(2, t, 8) for _ in range(2)]
    sums = key_sums(ks)
    for pos, start, end, written in ((39, 3, 9, 32), (20, 0, 1, 16), (35, 10, 30, 30)):
        direct = torch.stack([kernel_weights(q[:, pos], k[:, :written])[:, start:end].sum(-1) for q, k in zip(qs, ks)])
        assert event_focus(qs, sums, pos, start, end, written) == pytest.approx(direct * written / (end - start),
                                                                                rel=1e-5)

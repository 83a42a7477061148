"""The one-GPU recipes (experiment=table2_mini, experiment=passkey_gpu) compose to what they promise and run end
to end at tiny size on the CPU."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run(args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, "run.py", *args, "trainer.progress=false", "logger=none",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text())["results"]


def test_table2_mini_is_a_small_lm_on_python_code_for_at_least_90m_tokens_reported_on_test():
    for memory in sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml")):
        cfg = composed("experiment=table2_mini", f"memory={memory}")
        assert cfg.memory.name == memory and cfg.model.flavour == "lm_mini" and cfg.model.segment_len == 512
    t, tr = cfg.task, cfg.trainer
    assert t.dataset == "python_code" and t.seq_len == 16 * 512 and t.eval_split == "test"  # the paper's 16 segments
    tokens = tr.steps * tr.batch_size * tr.grad_accum * t.seq_len
    assert 90e6 <= tokens <= 120e6 and tr.compile and tr.precision == "bf16" and cfg.model.tokenizer == "byte"
    assert tr.time_budget_s is None  # equal steps for every memory; only the shape scan trains against the clock


def test_table2_paper_shape_keeps_the_papers_lm():
    cfg = composed("experiment=table2_paper_shape", "memory=linear")
    assert cfg.model.flavour == "lm_paper" and cfg.model.segment_len == 2048 and cfg.task.seq_len == 32768
    tokens = cfg.trainer.steps * cfg.trainer.batch_size * cfg.trainer.grad_accum * cfg.task.seq_len
    assert 80e6 <= tokens <= 120e6 and cfg.task.eval_split == "validation"


def test_table2_mini_runs_at_tiny_size(tmp_path):
    r = run(["experiment=table2_mini", "model=tiny", "model.segment_len=32", "task.seq_len=128", "trainer.steps=2",
             "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.compile=false", "trainer.precision=fp32",
             "task.max_bytes=400000", "task.eval_max_docs=2", "task.eval_max_tokens=128"], tmp_path / "run")
    assert r["train/steps"] == 2 and 1 < r["test/ppl"] < 259 and r["test/bpb"] > 0  # reported on test packages
    assert len(r["test/loss_by_segment"]) == 4  # 128 tokens in segments of 32
    assert r["data/manifest"]["max_bytes"] == 400000 and sum(r["data/manifest"]["bytes"].values()) <= 400000


def test_passkey_gpu_is_the_papers_task_with_a_curriculum():
    cfg = composed("experiment=passkey_gpu", "memory=linear")
    t = cfg.task
    assert list(t.key_range) == [1, 50000] and list(t.lengths)[2:] == [32768, 131072, 262144, 524288, 1048576]
    assert t.samples * (t.depth_sweep or len(t.depths)) >= 20 and t.haystack == "repeat"
    assert t.train_lengths_end[1] // cfg.model.segment_len >= 8  # training prompts span many segments
    assert t.local_warmup_steps == 0 and t.key_ramp_steps > 0 and t.length_ramp_steps > 0  # it starts from the base


def test_passkey_gpu_base_is_the_same_decoder_with_every_prompt_in_one_segment():
    """The base every memory starts from: passkey_gpu's model without a memory, its segment as long as any prompt it
    trains or is evaluated on, so that it learns to copy a key it can see."""
    base, gpu = composed("experiment=passkey_gpu_base"), composed("experiment=passkey_gpu", "memory=linear")
    assert base.memory.name == "none" and base.model.arch == gpu.model.arch
    assert base.model.segment_len >= max(*base.task.train_lengths, *base.task.lengths)
    assert list(base.task.key_range) == list(gpu.task.key_range) and base.task.local_warmup_steps == 0


def test_passkey_gpu_runs_at_tiny_size_and_plots_accuracy_by_distance(tmp_path):
    out = tmp_path / "run"
    r = run(["experiment=passkey_gpu", "model.segment_len=32",
             "model.arch={dim:32,n_layers:1,n_heads:2,n_kv_heads:2,head_dim:16,ffn_dim:64}",
             "task.lengths=[320,512]", "task.depth_sweep=2", "task.samples=2", "task.val_samples=1",
             "task.local_warmup_steps=1", "task.local_warmup_segment_len=512", "task.train_lengths=[250,260]",
             "task.train_lengths_end=[300,320]", "task.length_ramp_steps=2", "task.key_ramp_steps=1",
             "trainer.steps=2", "trainer.batch_size=2", "trainer.compile=false", "trainer.precision=fp32",
             "trainer.eval_every=100"], out)
    assert r["train/steps"] == 3 and len(r["passkey/grid"]) == 4
    bins = r["passkey/by_segments_back"]
    assert sum(b["n"] for b in bins) == 8 and (out / "passkey_by_distance.png").stat().st_size > 1000
    assert {"passkey/acc_earlier@320", "passkey/exact_earlier@512"} <= set(r)


FAKE_RUN = """#!{python}
# Stands in for `python run.py ...`: 'trainer.steps=1' finishes at once, anything else runs until stopped.
import json, os, sys, time
from pathlib import Path
out = Path(next(a for a in sys.argv if a.startswith("hydra.run.dir=")).split("=", 1)[1])
(out / "device.txt").write_text(os.environ["CUDA_VISIBLE_DEVICES"] + " " + " ".join(sys.argv[2:]))
(out / "threads.txt").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
if "trainer.steps=1" not in sys.argv:
    time.sleep(600)
(out / "results.json").write_text(json.dumps({{"results": {{"passkey/acc": 0.5, "passkey/acc_earlier@32K": 0.25}}}}))
"""


def test_variants_share_the_gpus_and_a_budget_stops_a_run(tmp_path):
    """Three variants on two GPUs: two start at once, the third waits for a free GPU; the one that would run for
    ever is stopped at the budget and reported, the others' results are collected."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_RUN.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "variants"
    cmd = [sys.executable, "scripts/passkey_gpu_variants.py", str(out), "--gpus", "0,1", "--budget", "3",
           "--python", str(fake), "--variant", "quick=trainer.steps=1", "--variant", "slow=trainer.steps=9",
           "--variant", "next=trainer.steps=1 memory=delta task.samples=3", "--", "task.samples=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr  # not every variant finished
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())}
    assert [rows[n]["status"] for n in ("quick", "slow", "next")] == ["ok", "timed out", "ok"]
    assert rows["quick"]["passkey/acc"] == 0.5 and "passkey/acc" not in rows["slow"]
    assert 3 <= rows["slow"]["wall_s"] < 10
    devices = {n: (out / n / "device.txt").read_text().split() for n in rows}
    assert devices["quick"][0] != devices["slow"][0]  # side by side on the two GPUs
    assert devices["next"][0] == devices["quick"][0]  # then on the GPU that quick freed
    # The shared overrides first: a variant's own value of a key comes last, and Hydra takes the last.
    assert devices["next"][1:] == ["experiment=passkey_gpu", "task.samples=2", "trainer.steps=1", "memory=delta",
                                   "task.samples=3", "logger=none", "trainer.progress=false",
                                   f"hydra.run.dir={out / 'next'}"]
    table = (out / "summary.md").read_text()
    assert "| quick | ok |" in table and "| slow | timed out |" in table and "passkey/acc_earlier@32K" in table


def test_per_gpu_runs_several_variants_side_by_side_on_one_gpu(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_RUN.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "variants"
    cmd = [sys.executable, "scripts/passkey_gpu_variants.py", str(out), "--gpus", "3", "--per-gpu", "2",
           "--budget", "2", "--python", str(fake), "--variant", "a=trainer.steps=9", "--variant", "b=trainer.steps=9",
           "--variant", "c=trainer.steps=1"]
    started = time.monotonic()
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())}
    assert [rows[n]["status"] for n in "abc"] == ["timed out", "timed out", "ok"]
    assert {rows[n]["device"] for n in "abc"} == {"cuda:3"}
    assert time.monotonic() - started < 2 * 2 + 20  # a and b ran at once, not one after the other
    # Each of the two slots gets half the cores, unless OMP_NUM_THREADS says otherwise.
    assert {(out / n / "threads.txt").read_text() for n in "abc"} == {str(max(1, os.cpu_count() // 2))}
    bad = subprocess.run([*cmd[:3], "--per-gpu", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert bad.returncode != 0 and "--per-gpu: 0 must be an integer >= 1" in bad.stderr


def test_reproduce_mini_runs_every_memory_in_each_benchmark():
    memories = sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml"))
    # Under `make test` the parent make's variables would make this one print "Leaving directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "reproduce-mini"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "passkey_gpu_variants.py" in line]
    assert [r.split("--experiment ")[1].split()[0] for r in runs] == \
        ["table2_mini", "passkey_gpu_base", "passkey_gpu", "none"]
    assert "HF_HUB_OFFLINE=1" in runs[2] and all(f'--variant "{m}-s{s}=memory={m} seed={s} model.init_from=' in runs[2]
                                                 for m in memories for s in (0, 1))  # make passkey-grid's runs
    runs = [runs[0], runs[3]]
    assert "HF_HUB_OFFLINE=1" in runs[1] and all(f"--variant {m}=memory={m}" in runs[1] for m in memories)
    seeds = {m: (0, 1, 2) if m in ("none", "linear") else (0, 1) for m in memories}  # Table 2 with its seeds
    assert runs[0].count("--variant") == sum(map(len, seeds.values())) and "--per-gpu 4" in runs[0]
    one_micro_batch = " trainer.batch_size=16 trainer.grad_accum=1"  # the same 16 sequences per step
    micro = {"memorizing": one_micro_batch, "rmt": one_micro_batch}
    assert all(f'--variant "{m}-s{s}=memory={m} seed={s}{micro.get(m, "")}"' in runs[0]
               for m in memories for s in seeds[m])
    assert "task=booksum" in runs[1] and "infini_bench.report" in proc.stdout.splitlines()[-1]


def test_ablations_mini_runs_each_arm_with_two_seeds_and_every_arm_builds(variant_calls):
    """`make ablations-mini` as it would run: two seeds per arm on the Table 2 recipe, and each arm's overrides
    compose (no misspelt key) and build its model (no value the memory refuses), before any GPU time is spent."""
    from infini_bench.model import build_model
    from tasks.runner import memory_fields

    words = variant_calls("ablations-mini")[0]
    assert words[words.index("--experiment") + 1] == "table2_mini" and "HF_HUB_OFFLINE=1" in words
    variants = [words[i + 1] for i, w in enumerate(words) if w == "--variant"]
    arms: dict[str, list[int]] = {}
    for variant in variants:
        name, _, overrides = variant.partition("=")
        arm, seed = name.rsplit("-s", 1)
        assert overrides.split()[-1] == f"seed={seed}"
        arms.setdefault(arm, []).append(int(seed))
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=table2_mini", *overrides.split()])
        build_model("tiny", segment_len=8, n_layers=1, gate_init=cfg.model.gate_init, **memory_fields(cfg))
    assert len(arms) >= 9 and all(seeds == [0, 1] for seeds in arms.values())
    assert {"linear-read_norm", "linear-fp32", "linear-detached", "linear-empty_local"} <= set(arms)


def test_make_passkey_grid_runs_every_memory_with_two_seeds_and_stores_fit_the_prompts(variant_calls):
    """`make passkey-grid` as it would run: a base per seed, then every memory from its seed's base. Memorizing's
    store holds the longest training prompt while training and the longest evaluation prompt whole outside it (else
    its key is evicted before the question), and full attention stops at 32K."""
    bases, grid = variant_calls("passkey-grid")
    assert bases[bases.index("--experiment") + 1] == "passkey_gpu_base" and "HF_HUB_OFFLINE=1" in bases
    folder = Path(bases[bases.index("--experiment") - 1])
    base_seeds = dict(bases[i + 1].split("=", 1) for i, w in enumerate(bases) if w == "--variant")
    assert base_seeds == {"s0": "seed=0", "s1": "seed=1"}
    assert grid[grid.index("--experiment") + 1] == "passkey_gpu" and "HF_HUB_OFFLINE=1" in grid
    variants = dict(grid[i + 1].split("=", 1) for i, w in enumerate(grid) if w == "--variant")
    memories = sorted(p.stem for p in (ROOT / "conf" / "memory").glob("*.yaml"))
    assert sorted(variants) == [f"{m}-s{s}" for m in memories for s in (0, 1)]
    for name, overrides in variants.items():
        memory, seed = name.rsplit("-s", 1)
        cfg = composed("experiment=passkey_gpu", *overrides.split())
        assert (cfg.memory.name, cfg.seed) == (memory, int(seed))
        assert Path(cfg.model.init_from) == folder / f"s{seed}" / "model.safetensors"  # its own seed's base
        if memory == "memorizing":
            longest_training = max(cfg.task.train_lengths_end) + len(" 50000.")
            assert cfg.memory.knn_size >= longest_training
            assert cfg.memory.eval_knn_size >= longest_passkey_sample(cfg.task) and cfg.task.eval_batch <= 10
        if memory == "full":
            assert max(cfg.task.lengths) == 32768
        else:
            assert list(cfg.task.lengths) == [2048, 8192, 32768, 131072, 262144, 524288, 1048576]


def longest_passkey_sample(t) -> int:
    """Prompt and answer tokens of the longest evaluation sample the task config makes."""
    from infini_bench.tokenizer import ByteTokenizer
    from tasks.passkey_data import make_sample

    depths = [i / (t.depth_sweep - 1) for i in range(t.depth_sweep)]
    samples = [make_sample(max(t.lengths), d, t.seed + i, ByteTokenizer(), t.haystack, tuple(t.key_range))
               for d in depths for i in range(t.samples)]
    return max(len(s.input_ids) + len(s.answer_ids) for s in samples)

"""Run variants of experiment=passkey_gpu (or of any recipe) side by side, one per GPU, each under a budget.

    python scripts/passkey_gpu_variants.py OUT -- model.init_from=BASE/model.safetensors   # the built-in variants
    python scripts/passkey_gpu_variants.py OUT --variant base= --variant delta=memory=delta --budget 600
    python scripts/passkey_gpu_variants.py OUT --variant a=trainer.steps=800 -- trainer.log_every=10
    python scripts/passkey_gpu_variants.py OUT --experiment table2_mini --per-gpu 4 --variant none=memory=none ...

A variant is `name=override override ...`; overrides after `--` go to every variant, before its own, so that a
variant's value of a key wins over the shared one (Hydra takes the last). Each variant runs
`run.py experiment=passkey_gpu ...` (`--experiment` picks another recipe, `none` none) with CUDA_VISIBLE_DEVICES set to its GPU and its run folder at OUT/<name>
(results.json, metrics.jsonl, plots), and is stopped when it outlives --budget seconds. --per-gpu K runs K
variants side by side on each GPU (small models leave one mostly idle); more variants than slots wait for a
free one. OUT/summary.json and OUT/summary.md collect every variant's status and headline
numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Without --variant: the Infini-attention variants and Memorizing on experiment=passkey_gpu, which starts from a base
# decoder: pass it to every variant after `--`, e.g. -- model.init_from=<experiment=passkey_gpu_base run>/model.safetensors
VARIANTS = {
    "linear": ["memory=linear"],
    "delta": ["memory=delta"],
    "memorizing": ["memory=memorizing", "memory.knn_size=4096", "memory.eval_knn_size=1049000", "task.eval_batch=10"],
}
HEADLINE = ("passkey/acc/earlier_segment", "passkey/exact/earlier_segment", "passkey/acc", "passkey/exact",
            "passkey/chance", "val/ppl", "val/bpb", "test/ppl", "test/bpb", "train/steps", "train/seconds",
            "booksum/rougeL", "booksum/overall", "recall/acc", "recall/chance")
# Families of keys shown too, one column per key: passkey by length, recall by gap and by pair count, booksum's
# overall ROUGE by input length beside the oracle rows at each length (docs/BOOKSUM.md).
FAMILIES = ("passkey/acc_earlier@", "recall/acc@gap=", "recall/acc@pairs=", "booksum/overall@",
            "booksum/oracle_memory/overall@", "booksum/oracle_local/overall@", "booksum/events_beyond_window@")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or "/" in name:
        raise SystemExit(f"error: --variant: {text!r} must be name=override override ... (name without '/')")
    return name, overrides.split()


def default_slots() -> list[str]:
    """One slot per visible GPU; a machine without one runs on the CPU, one variant at a time."""
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        n = 0
    return [str(i) for i in range(n)] or ["cpu"]


def launch(name: str, overrides: list[str], slot: str, out: Path, python: str, experiment: str,
           threads: int = 1) -> subprocess.Popen:
    # CPU threads: a share of the cores each (OMP_NUM_THREADS, unless set), not every core for every run. Five
    # recall runs on one H200 with 16 cores trained 2.7 times as many steps in the same time with three threads
    # each (and two micro-batches of 256 a step instead of one of 512) as with sixteen each (docs/RECALL.md).
    env = {"OMP_NUM_THREADS": str(threads), **os.environ,
           "CUDA_VISIBLE_DEVICES": "" if slot == "cpu" else slot, "WANDB_MODE": "disabled"}
    recipe = [] if experiment == "none" else [f"experiment={experiment}"]
    cmd = [python, "run.py", *recipe, *overrides, "logger=none", "trainer.progress=false",
           f"hydra.run.dir={out / name}"]
    (out / name).mkdir(parents=True, exist_ok=True)
    log = open(out / name / "log.txt", "w")
    log.write(" ".join(cmd) + "\n")
    log.flush()
    # Its own process group: the budget stops the run and anything it started, and nothing else.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_all(variants: dict[str, list[str]], common: list[str], slots: list[str], budget: float, out: Path,
            python: str = sys.executable, experiment: str = "passkey_gpu", poll: float = 1.0) -> list[dict]:
    """Every variant to the end or to its budget, at most one per slot at a time; one summary row each."""
    out.mkdir(parents=True, exist_ok=True)
    queue = list(variants.items())
    running: dict[str, tuple[subprocess.Popen, int, float]] = {}  # name -> (process, slot index, start time)
    rows = []
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    while queue or running:
        free = [i for i in range(len(slots)) if i not in {slot for _, slot, _ in running.values()}]
        while queue and free:
            name, overrides = queue.pop(0)
            slot = free.pop(0)
            proc = launch(name, common + overrides, slots[slot], out, python, experiment, threads)
            running[name] = (proc, slot, time.monotonic())
        time.sleep(poll)
        for name, (proc, slot, started) in list(running.items()):
            elapsed = time.monotonic() - started
            if proc.poll() is None and elapsed < budget:
                continue
            timed_out = proc.poll() is None
            if timed_out:
                stop(proc)
            del running[name]
            rows.append(summary_row(name, common + variants[name], slots[slot], elapsed, proc.returncode, timed_out,
                                    out))
    rows.sort(key=lambda r: list(variants).index(r["variant"]))
    write_summary(rows, out)
    return rows


def summary_row(name: str, overrides: list[str], slot: str, elapsed: float, code: int, timed_out: bool,
                out: Path) -> dict:
    results_path = out / name / "results.json"
    results = json.loads(results_path.read_text())["results"] if results_path.exists() and not timed_out else {}
    status = "timed out" if timed_out else "ok" if code == 0 and results else f"failed (exit {code})"
    return {"variant": name, "overrides": overrides, "device": "cpu" if slot == "cpu" else f"cuda:{slot}",
            "status": status, "wall_s": round(elapsed, 1),
            **{k: results[k] for k in HEADLINE if k in results},
            **{k: v for k, v in results.items() if _family(k)}}


def _family(key: str) -> bool:
    """A key of a family (FAMILIES), not a single cell of recall's grid (`recall/acc@pairs=8,gap=1`)."""
    return key.startswith(FAMILIES) and "," not in key


def write_summary(rows: list[dict], out: Path) -> None:
    """summary.json and a markdown table, each written atomically."""
    columns = ["variant", "status", "wall_s", *(k for k in HEADLINE if any(k in r for r in rows)),
               *dict.fromkeys(k for r in rows for k in r if _family(k))]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", *(f"- {r['variant']}: `{' '.join(r['overrides']) or '(the recipe as configured)'}`" for r in rows)]
    for name, text in (("summary.json", json.dumps(rows, indent=2)), ("summary.md", "\n".join(lines) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder that receives one run folder per variant and the summary")
    p.add_argument("--variant", action="append", default=[], help="name=override override ... (repeatable)")
    p.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds per variant (default 600)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices, or 'cpu' (default: every visible GPU)")
    p.add_argument("--per-gpu", type=int, default=1, help="variants run side by side on each GPU (default 1)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs run.py")
    p.add_argument("--experiment", default="passkey_gpu", help="the recipe every variant starts from ('none': none)")
    args = p.parse_args(own)
    variants = dict(map(parse_variant, args.variant)) if args.variant else dict(VARIANTS)
    if args.per_gpu < 1:
        raise SystemExit(f"error: --per-gpu: {args.per_gpu} must be an integer >= 1")
    slots = [gpu for gpu in (args.gpus.split(",") if args.gpus else default_slots()) for _ in range(args.per_gpu)]
    rows = run_all(variants, common, slots, args.budget, args.out, args.python, args.experiment)
    print((args.out / "summary.md").read_text())
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()

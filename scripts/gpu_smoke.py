"""Every registered memory, compiled, on the GPU in two to three minutes: the first thing to run on a new machine
or torch version, so a version-specific compile failure or dtype clash shows at once (`make gpu-smoke`).

    python scripts/gpu_smoke.py                        # every memory; exit 1 if any fails
    python scripts/gpu_smoke.py --memories txl,rmt --out smoke.json
    python scripts/gpu_smoke.py --device cpu --backend eager   # the same checks on a CPU (tracing only)

Each memory runs in a process of its own, all at once (compilation is mostly host work), under --timeout.

Per memory, at tiny size (2 layers, N = 32, bf16 autocast on a GPU): the blocks compiled as
`trainer.compile=true` does, four AdamW steps on a sequence of four segments and a partial fifth (the step
time is the median of the last three), then a streamed evaluation of nine segments and a partial tenth, segment
by segment, compared with the same model run eagerly in one call (relative error of the logits). A row fails on
any exception or a non-finite loss; the error is its first line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infini_bench.attention import attention_backends  # noqa: E402
from infini_bench.memories import memory_names  # noqa: E402
from infini_bench.model import build_model  # noqa: E402
from infini_bench.train import autocast  # noqa: E402

N = 32
# The defaults are sized for the paper's model; these keep every memory's mechanism in play at N = 32.
ARGS = {"memorizing": {"knn_size": 128, "top_k": 8}, "rmt": {"num_mem_tokens": 4}}
TOLERANCE = 5e-2  # bf16 activations: the compiled and eager kernels round differently


def smoke(memory: str, device: torch.device, backend: str | None, steps: int) -> dict:
    attention_backends()  # the attention kernels runs use
    torch.manual_seed(0)
    model = build_model("tiny", memory=memory, memory_args=ARGS.get(memory), segment_len=N, n_layers=2).to(device)
    amp = autocast(device, "auto")
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 4 * N + 7), device=device, generator=gen)
    model.compile_blocks(**({"backend": backend} if backend else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with amp:
            logits = model(ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the GPU
        times.append(time.perf_counter() - start)
    first, step_ms = times[0], steady_ms(times)
    model.eval()
    long = torch.randint(0, model.cfg.vocab_size, (2, 9 * N + 5), device=device, generator=gen)
    start = time.perf_counter()
    with torch.no_grad(), amp:
        streamed = torch.cat([out.logits for out in model.segments(long)], dim=1).float()
        sync(device)
        stream_s = time.perf_counter() - start
        with torch.compiler.set_stance("force_eager"):
            whole = model(long).logits.float()
    rel = float((streamed - whole).norm() / whole.norm())
    ok = all(torch.isfinite(torch.tensor(losses))) and rel < TOLERANCE
    return {"memory": memory, "ok": ok, "first_step_s": first, "step_ms": step_ms,
            "steps_ms": [t * 1e3 for t in times], "stream_s": stream_s, "stream_rel_err": rel, "losses": losses}


def steady_ms(times: list[float]) -> float:
    """The median of the step times after the first (which compiles), in ms: a later one-off compile (Memorizing
    compiles its kNN layer's resumed graphs on the second step) does not count as the step time."""
    return statistics.median(times[1:] or times) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one(args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    try:
        return smoke(args.one, torch.device(args.device), args.backend, args.steps)
    except Exception as e:  # the row says what failed; the traceback goes to stderr
        traceback.print_exc()
        return {"memory": args.one, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memories", default=",".join(memory_names()), help="comma-separated (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300, help="seconds each memory may take")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a worker: one memory, its row as JSON on stdout
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return 0
    common = ["--device", args.device, "--steps", str(args.steps)]
    common += ["--backend", args.backend] if args.backend else []
    workers = {m: subprocess.Popen([sys.executable, __file__, "--one", m, *common], stdout=subprocess.PIPE, text=True)
               for m in args.memories.split(",")}
    rows = []
    for memory, proc in workers.items():
        try:
            out, _ = proc.communicate(timeout=args.timeout)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            rows.append(json.loads(lines[-1]) if lines else
                        {"memory": memory, "ok": False, "error": f"worker exited {proc.returncode} with no row"})
        except subprocess.TimeoutExpired:
            proc.kill()
            rows.append({"memory": memory, "ok": False, "error": f"no result within --timeout {args.timeout:g} s"})
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\ntorch {torch.__version__}, {name}, backend {args.backend or 'inductor'}")
    print(f"{'memory':<11} {'ok':<4} {'1st step s':>10} {'step ms':>8} {'stream s':>8} {'rel err':>8}  error")
    for r in rows:
        if "error" in r:
            print(f"{r['memory']:<11} {'FAIL':<4} {'':>10} {'':>8} {'':>8} {'':>8}  {r['error']}")
        else:
            print(f"{r['memory']:<11} {'ok' if r['ok'] else 'FAIL':<4} {r['first_step_s']:>10.1f} {r['step_ms']:>8.1f} "
                  f"{r['stream_s']:>8.2f} {r['stream_rel_err']:>8.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": name, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Per-GPU training throughput and peak memory of the 1B and 8B shapes under FSDP2 (random init, random tokens).

Each run: build the flavour on this rank's device, shard it (FSDP2, bf16 compute, fp32 master weights and
gradient reduction, activation checkpointing per block), train `--warmup` untimed then `--steps` timed AdamW
steps with the chunked loss (the (T, 128K) logits are never held whole), and record tokens/s per GPU and
torch.cuda.max_memory_allocated / reserved (max over ranks).

  torchrun --standalone --nproc_per_node=4 scripts/fsdp_bench.py --runs 1b:4096:4 1b:32768:1 8b:8192:1 \
      --out bench_fsdp.json
  # CPU smoke test (gloo, the tiny flavour):
  torchrun --standalone --nproc_per_node=2 scripts/fsdp_bench.py --runs tiny:256:2 --segment-len 64 \
      --steps 2 --warmup 1 --out /tmp/fsdp_smoke.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.flops import linear_params, train_flops  # noqa: E402
from infini_bench.distributed import (  # noqa: E402
    DistInfo, all_reduce_mean, cleanup, init_distributed, shard_model,
)
from infini_bench.memories import memory_names  # noqa: E402
from infini_bench.model import build_model  # noqa: E402
from infini_bench.model_config import FLAVOURS  # noqa: E402
from infini_bench.train import lm_loss  # noqa: E402

GIB = 2**30


def parse_run(spec: str) -> tuple[str, int, int]:
    """'flavour:seq_len[:batch_per_gpu]' -> (flavour, seq_len, batch)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in FLAVOURS:
        raise argparse.ArgumentTypeError(f"{spec!r} is not flavour:seq_len[:batch], flavour one of {list(FLAVOURS)}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 1


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench(info: DistInfo, flavour: str, seq_len: int, batch: int, args: argparse.Namespace) -> dict:
    cuda = info.device.type == "cuda"
    overrides = {"memory": args.memory}
    if args.segment_len:
        overrides["segment_len"] = args.segment_len
    torch.manual_seed(args.seed)  # the same init on every rank: fully_shard keeps each rank's slice
    with torch.device(info.device):
        model = build_model(flavour, **overrides)
    cfg = model.cfg
    # Training FLOPs per token by the one formula bench/ uses too (3 x forward, per memory: bench/flops.py).
    flops_per_token = train_flops(cfg, linear_params(model), seq_len) / seq_len
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]
    shard_model(model, param_dtype=dtype, activation_checkpointing=not args.no_ac, compile=args.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator(device=info.device).manual_seed(args.seed + info.rank)
    build_peak = None
    if cuda:  # building holds the whole fp32 model on every GPU for a moment; training is measured apart
        build_peak = max_over_ranks(torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=info.device, generator=gen)
        loss = lm_loss(model, x[:, :-1], x[:, 1:], chunk_tokens=args.chunk_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):  # compilation, allocator warm-up, NCCL communicators
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    loss = all_reduce_mean(losses[-1]).item()  # waits for the last step
    if cuda:
        torch.cuda.synchronize()
    elapsed = max_over_ranks(time.perf_counter() - t0)
    tokens_per_gpu = batch * seq_len * args.steps / elapsed
    result = {
        "flavour": flavour, "seq_len": seq_len, "segment_len": cfg.segment_len, "batch_per_gpu": batch,
        "memory": cfg.memory, "world_size": info.world_size, "params": cfg.num_params(),
        "dtype": args.dtype, "activation_checkpointing": not args.no_ac, "compile": args.compile,
        "steps": args.steps, "step_s": elapsed / args.steps, "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": tokens_per_gpu * flops_per_token / (args.peak_tflops * 1e12) if cuda else None,
        "peak_alloc_gib": max_over_ranks(torch.cuda.max_memory_allocated() / GIB) if cuda else None,
        "peak_reserved_gib": max_over_ranks(torch.cuda.max_memory_reserved() / GIB) if cuda else None,
        "build_peak_alloc_gib": build_peak, "loss": loss,
    }
    del model, optimizer, losses
    return result


def table(results: list[dict]) -> str:
    """A Markdown table of the runs, ready for docs/BENCHMARKS.md."""
    cols = ["flavour", "seq_len", "segment_len", "batch_per_gpu", "world_size", "tokens_per_s_per_gpu", "step_s",
            "mfu", "peak_alloc_gib", "peak_reserved_gib", "build_peak_alloc_gib", "loss", "error"]

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        return str(v)[:40]

    rows = [cols] + [[fmt(r.get(c)) for c in cols] for r in results]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(cols))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(s) for s in ("1b:4096:4", "1b:32768:1",
                                                                                         "8b:8192:1")])
    p.add_argument("--out", type=Path, required=True, help="JSON results file (rank 0 writes it after every run)")
    p.add_argument("--segment-len", type=int, default=None, help="default: the flavour's (2048)")
    p.add_argument("--memory", default="linear", choices=memory_names())
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="FSDP param_dtype (compute)")
    p.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="positions per head + loss chunk")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H200: 989)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    info = init_distributed()
    if not dist.is_initialized():
        sys.exit("launch with torchrun, e.g. torchrun --standalone --nproc_per_node=4 scripts/fsdp_bench.py ...")
    header = {"torch": torch.__version__, "world_size": info.world_size,
              "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"}
    results = []
    for flavour, seq_len, batch in args.runs:
        try:
            results.append(bench(info, flavour, seq_len, batch, args))
        except torch.cuda.OutOfMemoryError as err:  # every rank runs the same shapes, so all of them land here
            results.append({"flavour": flavour, "seq_len": seq_len, "batch_per_gpu": batch,
                            "error": f"OOM: {str(err).splitlines()[0]}"})
        gc.collect()  # free this run's model before the next one is built
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
        if info.is_main:
            print(json.dumps(results[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**header, "results": results}, indent=1))
    if info.is_main:
        print(f"\n{header['device']} x {info.world_size}, torch {header['torch']}\n{table(results)}")
    cleanup()


if __name__ == "__main__":
    main()

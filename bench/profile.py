"""Where one training step's time goes, for any memory, at the training benchmark's shape (torch.profiler).

    python -m bench.profile --memory rmt --compile          # lm_paper, T = 32K, N = 2K, bf16 autocast
    python -m bench.profile --memory txl --out prof.txt     # the table also written to a file

Prints the step time, how much of it the GPU was busy (the sum of kernel times: far below the step time
means the step is bound by launches or the host), the number of kernel launches, and the kernels that take
the most time. Runs on a CPU too (`--cpu`: the tiny shape, CPU time only).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.common import Sizes
from infini_bench.model import SegmentTransformer
from infini_bench.model_config import FLAVOURS
from infini_bench.train import autocast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", default="rmt")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cpu", action="store_true", help="tiny shape on the CPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=25, help="kernels listed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    sizes = Sizes.tiny() if device.type == "cpu" else Sizes()
    cfg = replace(FLAVOURS[sizes.train_flavour], segment_len=sizes.train_segment, memory=args.memory,
                  memory_args=sizes.memory_args.get(args.memory))
    torch.manual_seed(0)
    with torch.device(device):
        model = SegmentTransformer(cfg)
    if args.compile:
        model.compile_blocks()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, sizes.train_seq + 1), device=device)

    def step() -> None:
        with autocast(device, "auto"):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    times = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    events = prof.key_averages()
    cuda = device.type == "cuda"
    kernels = [e for e in events if cuda and e.device_type.name == "CUDA"]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
    launches = sum(e.count for e in kernels) / args.steps
    step_ms = statistics.median(times) * 1e3
    head = (f"memory={args.memory}{' +compile' if args.compile else ''}, {sizes.train_flavour}, "
            f"T={sizes.train_seq}, N={sizes.train_segment}, {device}: step {step_ms:.1f} ms (median of "
            f"{args.steps}, profiler on)")
    if cuda:
        head += (f"; GPU busy {busy_ms:.1f} ms ({busy_ms / step_ms:.0%} of the step), {launches:.0f} kernel "
                 f"launches per step")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70)
    print(head)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n" + table + "\n")


if __name__ == "__main__":
    main()

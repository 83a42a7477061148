"""The decode section: per-token latency after prompts of growing length, eager and as a CUDA graph."""
from __future__ import annotations

import statistics
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from bench.common import (Clock, PeakMemory, Sizes, compute_dtype, error_text, floor_ms, free_memory, time_ms,
                          with_memory)
from bench.flops import decode_cost, linear_params
from infini_bench.model import build_model
from infini_bench.model_config import FLAVOURS
from infini_bench.paper import length_label

def bench_decode(device: torch.device, sizes: Sizes, ceilings: dict) -> dict:
    """Per-token latency after prompts of growing length, across one segment boundary (a memory write): the
    eager decode_step, and the StaticDecoder step (a CUDA graph on a GPU, the same fixed-shape step run
    eagerly on the CPU)."""
    from infini_bench.generate import StaticDecoder, decode_step, prefill

    clock, mem = Clock(device), PeakMemory(device)
    cfg = with_memory(FLAVOURS[sizes.decode_flavour], sizes.decode_memory, sizes)
    n = cfg.segment_len
    dtype = compute_dtype(device)
    static_name = "graph" if device.type == "cuda" else "static"
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).to(dtype).eval()
    p_lin = linear_params(model)
    g = torch.Generator(device=device).manual_seed(0)
    half = sizes.decode_steps // 2
    # Warm-up over the very positions the timed steps visit: attention kernels may build a plan for every
    # new key length the first time they see it, which would otherwise land in the first context's timings.
    _, state = prefill(model, torch.randint(0, cfg.vocab_size, (1, n - half), device=device))
    for _ in range(sizes.decode_steps):
        decode_step(model, torch.zeros(1, dtype=torch.long, device=device) + 7, state)
    del state
    rows = []
    for ctx in sizes.decode_contexts:
        for step_name in ("eager", static_name):
            free_memory(device)
            mem.reset()
            try:
                # The prompt stops `half` tokens before a segment boundary, so the timed steps cross it.
                ids = torch.randint(0, cfg.vocab_size, (1, ctx - half), device=device, generator=g)
                start = clock.mark()
                _, state = prefill(model, ids)
                end = clock.mark()
                toks = torch.randint(0, cfg.vocab_size, (sizes.decode_steps, 1), device=device, generator=g)
                if step_name == "eager":
                    step = partial(decode_step, model)
                else:  # capture (on a GPU) before the clock starts
                    decoder = StaticDecoder(model, state)
                    step = lambda tok, _state, d=decoder: d.step(tok)  # noqa: E731
                lat = time_ms(_StepFeeder(step, toks, state), clock, warmup=0, iters=sizes.decode_steps)
                prefill_s = clock.ms(start, end) / 1e3
            except Exception as e:
                rows.append({"context": ctx, "step": step_name, "error": error_text(e)})
                continue
            flops, nbytes = decode_cost(cfg, p_lin, n // 2, torch.finfo(dtype).bits // 8)
            lat_sorted = sorted(lat)
            rows.append({"context": ctx, "step": step_name, "median_ms": statistics.median(lat),
                         "mean_ms": statistics.fmean(lat), "p90_ms": lat_sorted[int(0.9 * (len(lat) - 1))],
                         "max_ms": lat_sorted[-1], "floor_ms": floor_ms(flops, nbytes, ceilings),
                         "gflop": flops / 1e9, "gb": nbytes / 1e9, "prefill_s": prefill_s,
                         "peak_gib": mem.peak_gib(), "steps": sizes.decode_steps})
    del model
    free_memory(device)
    targets = []
    for step_name in ("eager", static_name):
        done = [r for r in rows if "median_ms" in r and r["step"] == step_name]
        if len(done) >= 2:
            lo, hi = done[0], done[-1]
            ratio = hi["median_ms"] / lo["median_ms"]
            targets.append({"target": f"{step_name}: latency at {length_label(hi['context'])} <= 2 x at "
                                      f"{length_label(lo['context'])}", "measured": ratio, "met": ratio <= 2})
    return {"config": {"flavour": sizes.decode_flavour, "memory": sizes.decode_memory, "batch": 1, "segment_len": n,
                       "precision": f"model.to({str(dtype).removeprefix('torch.')}), memory state fp32, "
                                    "torch.inference_mode",
                       "step": "eager: infini_bench.generate.decode_step; graph: generate.StaticDecoder.step, one "
                               "CUDA graph replay per token (static: the same step uncaptured, on CPU); prompt "
                               "by generate.prefill",
                       "steps": f"{sizes.decode_steps} steps from context - {half}: one crosses a segment "
                                f"boundary and writes the memory"},
            "cost_formula": "FLOPs 2 P + 4 L H d c + 2 L H d (d + 1); bytes P b + 2 L H_kv d c b + "
                            "L H_kv d (d + 1) 4 (weights, KV cache at c = N/2, fp32 memory); b = 2 (bf16)",
            "rows": rows, "targets": targets}


class _StepFeeder:
    """Calls step(token, state) with the next of a fixed list of tokens (no host sync between steps)."""

    def __init__(self, step: Callable, toks: Tensor, state: Any):
        self.step, self.toks, self.state, self.i = step, toks, state, 0

    def __call__(self) -> Tensor:
        out = self.step(self.toks[self.i], self.state)
        self.i += 1
        return out

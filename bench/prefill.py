"""The prefill section: seconds and peak memory to stream prompts of growing length, against full attention."""
from __future__ import annotations

import statistics
from dataclasses import replace
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from bench.common import (Clock, PeakMemory, Sizes, compute_dtype, error_text, floor_ms, free_memory,
                          memory_args_used, time_ms)
from bench.flops import linear_params, prefill_bytes, prefill_flops
from infini_bench.model import SegmentTransformer, build_model
from infini_bench.model_config import FLAVOURS
from infini_bench.paper import length_label

@torch.inference_mode()
def _stream(model: SegmentTransformer, ids: Tensor) -> Tensor:
    """The model's own segment-streaming forward, keeping only the last logits (constant memory)."""
    out = None
    for out in model.segments(ids, last_only=True):
        pass
    return out.logits


@torch.inference_mode()
def _whole(model: SegmentTransformer, ids: Tensor) -> Tensor:
    """One forward over the whole prompt (plain full attention when segment_len >= its length)."""
    return model(ids, last_only=True).logits


def bench_prefill(device: torch.device, sizes: Sizes, ceilings: dict, compile_blocks: bool) -> dict:
    """Seconds and peak memory to stream prompts of growing length, against plain causal attention."""
    clock, mem = Clock(device), PeakMemory(device)
    base = FLAVOURS[sizes.prefill_flavour]
    dtype = compute_dtype(device)
    elt = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    rows = []

    def measure(name: str, model: SegmentTransformer, fn: Callable[[Tensor], Tensor], t: int, reps: int) -> None:
        free_memory(device)
        ids = torch.randint(0, base.vocab_size, (1, t), device=device, generator=g)
        mem.reset()
        before = mem.allocated_gib()
        try:
            secs = [x / 1e3 for x in time_ms(lambda: fn(ids), clock, warmup=0, iters=reps)]
            p_lin = linear_params(model)
            flops = prefill_flops(model.cfg, p_lin, t)
            nbytes = prefill_bytes(model.cfg, p_lin, t, elt)
        except Exception as e:  # one failing row (OOM, a memory's bug) must not lose the others
            rows.append({"name": name, "length": t, "error": error_text(e)})
            return
        s = statistics.median(secs)
        peak = mem.peak_gib()
        rows.append({"name": name, "length": t, "seconds": s, "tokens_per_s": t / s, "tflop": flops / 1e12,
                     "gb": nbytes / 1e9, "floor_s": floor_ms(flops, nbytes, ceilings) / 1e3,
                     "mfu": flops / s / (ceilings["matmul_tflops"] * 1e12), "peak_gib": peak,
                     "above_weights_gib": None if peak is None else peak - before, "reps": reps})

    def build(name: str, lengths: tuple[int, ...], warm: Callable[[SegmentTransformer], Tensor],
              **overrides) -> SegmentTransformer | None:
        """The model of one row (`base` with `overrides`), built and warmed up; a failure becomes an error row
        at every length."""
        free_memory(device)
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = build_model(replace(base, **overrides)).to(dtype).eval()
            if name.endswith("+compile"):
                model.compile_blocks()
            warm(model)
            return model
        except Exception as e:
            rows.extend({"name": name, "length": t, "error": error_text(e)} for t in lengths)
            return None

    names = prefill_names(sizes, compile_blocks)
    for name in names:
        memory = name.removesuffix("+compile")
        # Warm-up: a first segment (no memory yet) and a second one (with memory), the two shapes streamed.
        model = build(name, sizes.prefill_lengths,
                      lambda m: _stream(m, torch.randint(0, base.vocab_size, (1, 2 * base.segment_len), device=device)),
                      memory=memory, memory_args=sizes.memory_args.get(memory))
        for t in sizes.prefill_lengths if model is not None else ():
            measure(name, model, partial(_stream, model), t, reps=3 if t <= 131072 else 1)
        model = None
    # Plain causal attention over the whole prompt: memory none with one segment as long as the prompt.
    longest = max(sizes.prefill_lengths + sizes.full_lengths)
    full = build("full", sizes.full_lengths,
                 lambda m: _whole(m, torch.randint(0, base.vocab_size, (1, min(sizes.full_lengths)), device=device)),
                 memory="none", segment_len=longest)
    for t in sizes.full_lengths if full is not None else ():
        measure("full", full, partial(_whole, full), t, reps=3 if t <= 32768 else 2)
    full = None
    free_memory(device)
    rows += extrapolate_full(rows, sizes.prefill_lengths)
    return {"config": {"flavour": sizes.prefill_flavour, "batch": 1, "segment_len": base.segment_len,
                       "dim": base.dim, "layers": base.n_layers, "heads": f"{base.n_heads} x {base.head_dim}",
                       "kv_heads": base.n_kv_heads, "ffn": base.ffn_dim, "vocab": base.vocab_size,
                       "precision": f"model.to({str(dtype).removeprefix('torch.')}), memory state fp32, "
                                    "torch.inference_mode",
                       "stream": "SegmentTransformer.segments(ids, last_only=True): one segment at a time",
                       "full": "memory none, segment_len >= prompt: one causal SDPA (flash) per layer",
                       "memory_args": memory_args_used(names, sizes)},
            "flop_formula": "2 (P - P_head) R + 2 P_head S + 4 d H L pairs + memory + kNN selection (forward "
                            "only; the LM head runs on each segment's last position, S segments; R, pairs, "
                            "memory as in train, bench/flops.py)",
            "rows": rows, "targets": prefill_targets(rows, sizes, names)}


def extrapolate_full(rows: list[dict], lengths: tuple[int, ...]) -> list[dict]:
    """Full attention where it was not run: t(T) = a T + b T^2 through the two longest measured points."""
    pts = sorted((r["length"], r["seconds"]) for r in rows if r["name"] == "full" and "seconds" in r)
    if len(pts) < 2:
        return []
    (t1, s1), (t2, s2) = pts[-2:]
    b = max((s2 / t2 - s1 / t1) / (t2 - t1), 0.0)
    a = s1 / t1 - b * t1
    fit = f"a T + b T^2 through {length_label(t1)} and {length_label(t2)}"
    return [{"name": "full (extrapolated)", "length": t, "seconds": a * t + b * t * t,
             "tokens_per_s": t / (a * t + b * t * t), "extrapolated": fit} for t in lengths if t > t2]


def prefill_names(sizes: Sizes, compile_blocks: bool) -> list[str]:
    """Streamed rows: each memory, and each memory with its blocks compiled."""
    return list(sizes.prefill_memories) + ([f"{m}+compile" for m in sizes.prefill_memories] if compile_blocks
                                           else [])


def prefill_targets(rows: list[dict], sizes: Sizes, names: list[str]) -> list[dict]:
    targets = []
    big, small = max(sizes.prefill_lengths), min(sizes.prefill_lengths)
    fulls = {r["length"]: r for r in rows if r["name"].startswith("full") and "seconds" in r}
    for name in names:
        by_len = {r["length"]: r for r in rows if r["name"] == name and "seconds" in r}
        if big not in by_len:
            continue
        r = by_len[big]
        if big == 1048576:
            targets.append({"target": f"{name}: stream 1M in <= 12 s", "measured": r["seconds"],
                            "met": r["seconds"] <= 12})
        if small in by_len and r["peak_gib"] is not None:
            ratio = r["peak_gib"] / by_len[small]["peak_gib"]
            targets.append({"target": f"{name}: peak memory at {length_label(big)} <= 1.05 x at {length_label(small)}",
                            "measured": ratio, "met": ratio <= 1.05})
        if big in fulls:
            speedup = fulls[big]["seconds"] / r["seconds"]
            how = " (extrapolated)" if "extrapolated" in fulls[big] else ""
            targets.append({"target": f"{name}: >= 10 x faster than full attention at {length_label(big)}{how}",
                            "measured": speedup, "met": speedup >= 10})
    return targets

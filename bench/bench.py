"""Benchmarks, measured side by side in one run: training throughput, streaming prefill, decode.

    python -m bench.bench all --out results/bench.json --write-md docs/BENCHMARKS.md   # one H200, ~2 min
    python -m bench.bench all --compile --out results/bench.json                      # + compiled rows, ~5 min
    python -m bench.bench --cpu all --out /tmp/bench.json --write-md /tmp/BENCH.md    # tiny sizes, CI, ~10 s
    python -m bench.bench --out results/bench.json --write-md docs/BENCHMARKS.md       # re-render only

Every section first counts the two numbers of the work it times (floating-point operations, and the fewest
bytes it must move), turns them into a floor with the ceilings measured in the same run (a bf16 matrix
product, a device-to-device copy), and prints the floor beside the measured time, so the gap is visible.
GPU times come from CUDA events after warm-up, median of several repeats; CPU times from the host clock.
The JSON at --out keeps one entry per section (merged with what the file already holds), each with the
command, date, device and versions that produced it; --write-md rewrites only the marked sections of the
markdown file and keeps everything written by hand around them. Imports only `infini_bench` (no Hydra).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import re
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infini_bench.model import FLAVOURS, InfiniTransformer, ModelConfig, build_model
from infini_bench.paper import length_label

SECTIONS = ("train", "prefill", "decode")
DATASHEET = {"device": "H200 SXM", "bf16_tflops": 989.0, "hbm_tb_s": 4.8}  # dense bf16, HBM3e (vendor)
GIB = 2**30


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, as the paper's runs; fp32 on a CPU, where bf16 matrix products are emulated and slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """Mixed precision for training: bf16 autocast over fp32 parameters on a GPU, plain fp32 on a CPU."""
    dtype = compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


@dataclass
class Sizes:
    """Every size one run uses. The defaults are the paper's LM shape on one H200; `tiny()` runs on a 2-core CPU."""

    # train: paper Table 2 LM (12 layers, 8 x 128 heads, FFN 4096, 32K vocabulary), B = 1, T = 32K, N = 2K
    train_flavour: str = "lm_paper"
    train_seq: int = 32768
    train_segment: int = 2048
    train_rules: tuple[str, ...] = ("none", "linear", "delta", "full", "lucidrains")
    train_kv_heads: int | None = None  # None: the flavour's; the peer has no GQA, so tiny runs MHA
    train_warmup: int = 3
    train_iters: int = 10
    peer_warmup: int = 1  # the peer is ~10x slower and only compared against a 10x bound
    peer_iters: int = 3
    # prefill: the Llama-3.2-1B shape, random init, bf16 weights, streamed one segment at a time
    prefill_flavour: str = "1b"
    prefill_rules: tuple[str, ...] = ("linear", "delta")
    prefill_lengths: tuple[int, ...] = (32768, 131072, 1048576)
    full_lengths: tuple[int, ...] = (32768, 131072)  # plain causal attention; longer ones are extrapolated
    # decode: per-token latency of the 1B shape after a streamed prompt
    decode_flavour: str = "1b"
    decode_rule: str = "linear"
    decode_contexts: tuple[int, ...] = (4096, 1048576)
    decode_steps: int = 64
    # ceilings
    matmul_n: int = 8192
    copy_mib: int = 2048

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(train_flavour="tiny", train_kv_heads=FLAVOURS["tiny"].n_heads, train_seq=256, train_segment=64,
                   train_warmup=1, train_iters=2, peer_iters=2, prefill_flavour="tiny", prefill_lengths=(256, 512, 1024),
                   full_lengths=(256, 512),
                   decode_flavour="tiny", decode_contexts=(128, 1024), decode_steps=8, matmul_n=512,
                   copy_mib=32)


# ---------------------------------------------------------------------------------------------- timing


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks; call sync() first."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def time_ms(fn: Callable[[], Any], clock: Clock, warmup: int, iters: int) -> list[float]:
    """fn's time in ms, `iters` times after `warmup` untimed calls; one sync at the end."""
    for _ in range(warmup):
        fn()
    marks = []
    for _ in range(iters):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return [clock.ms(a, b) for a, b in marks]


class PeakMemory:
    """Peak bytes allocated on the GPU since the last reset (None on a CPU: torch does not track it there)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / GIB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ---------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, sizes: Sizes, dtype: torch.dtype) -> dict:
    """The two rates this run is held against: an n^3 matrix product and a device-to-device copy."""
    clock = Clock(device)
    n = sizes.matmul_n
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))  # never zeros
    ms = statistics.median(time_ms(partial(torch.matmul, a, b), clock, warmup=3, iters=10))
    matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    src = torch.randn(sizes.copy_mib * 2**20 // 4, device=device, generator=g)
    ms = statistics.median(time_ms(partial(torch.empty_like(src).copy_, src), clock, warmup=3, iters=10))
    copy_tb_s = 2 * src.numel() * 4 / (ms * 1e-3) / 1e12  # bytes read plus bytes written
    a = b = src = None
    free_memory(device)
    return {"matmul_tflops": matmul_tflops, "matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}",
            "copy_tb_s": copy_tb_s, "copy": f"{sizes.copy_mib} MiB fp32, read + write",
            "datasheet": DATASHEET if device.type == "cuda" else None}


# ---------------------------------------------------------------------------------------------- counting


def linear_params(model: nn.Module) -> int:
    """Weights every token is multiplied by: all nn.Linear weights, each counted once (tied ones too)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def attention_flops(cfg: ModelConfig, t: int, n: int) -> float:
    """Forward FLOPs of causal softmax attention inside segments of n over t tokens, all heads and layers.

    Per head and segment of length s: QK^T and PV are 2 s^2 d each, halved by the causal mask.
    """
    lengths = [n] * (t // n) + ([t % n] if t % n else [])
    return cfg.n_layers * cfg.n_heads * sum(s * s for s in lengths) * 2 * cfg.head_dim


def memory_flops(cfg: ModelConfig, rule: str, t: int, n: int) -> float:
    """Forward FLOPs of the compressive memory over t tokens from an empty memory.

    Write (Eq. 8) 2 t d d_v H_kv; z update t d H_kv; read (Eq. 7, numerator and denominator) 2 (t - n) d
    (d_v + 1) H, since the first segment has nothing to read; the delta rule (Eq. 9) reads once more per key.
    """
    if rule == "none" or t <= n:
        return 0.0
    d, hk, h = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads
    per_layer = 2 * t * d * d * hk + t * d * hk + 2 * (t - n) * d * (d + 1) * h
    if rule == "delta":
        per_layer += 2 * (t - n) * d * (d + 1) * hk
    return cfg.n_layers * per_layer


def train_flops(cfg: ModelConfig, p_linear: int, rule: str, t: int, n: int) -> float:
    """Model FLOPs of one training step: 3 x forward (backward = 2 x forward), no recomputation counted.

    6 P T + 3 (attention + memory forward), P = nn.Linear weights including the LM head (the embedding
    lookup is no matmul). Same formula for every row, so MFU compares like with like.
    """
    return 6 * p_linear * t + 3 * (attention_flops(cfg, t, n) + memory_flops(cfg, rule, t, n))


def train_bytes(p_all: int, p_linear: int, t: int, vocab: int) -> float:
    """A lower bound on the bytes of one step: AdamW over fp32 params (read param, grad, m, v; write param,
    m, v: 28 B), the grad write (4 B), the bf16 weight copies under autocast and their reads in forward and
    both backward products (12 B per linear weight), and the logits (bf16 out, fp32 loss, grad: ~12 B).
    Activations are not counted: the step is far from bound by these bytes."""
    return 32 * p_all + 12 * p_linear + 12 * t * vocab


def floor_ms(flops: float, nbytes: float, ceilings: dict) -> float:
    """The larger of compute time at the measured matmul rate and byte time at the measured copy rate."""
    return max(flops / (ceilings["matmul_tflops"] * 1e12), nbytes / (ceilings["copy_tb_s"] * 1e12)) * 1e3


# ---------------------------------------------------------------------------------------------- train


def lucidrains_model(cfg: ModelConfig, seq: int, n: int) -> tuple[nn.Module, Callable[[Tensor], Tensor], str]:
    """The public infini-transformer-pytorch (PyPI 0.2.1) at our shapes, trained through its own wrapper.

    Its feed-forward is GEGLU of width int(ff_mult * dim * 2 / 3): ff_mult = 1.5 ffn_dim / dim gives our
    ffn_dim (4096 for the paper's config: the same weights as our SwiGLU). No GQA, so H_kv = H is required.
    Memories are detached only at the end (full BPTT, as ours), falling back to its default (every 2
    segments) where that does not fit.
    """
    from infini_transformer_pytorch import InfiniTransformer as Lucid, InfiniTransformerWrapper

    if cfg.n_kv_heads != cfg.n_heads:
        raise ValueError("infini-transformer-pytorch has no GQA: needs model.n_kv_heads == model.n_heads")
    model = Lucid(num_tokens=cfg.vocab_size, dim=cfg.dim, depth=cfg.n_layers, dim_head=cfg.head_dim,
                  heads=cfg.n_heads, ff_mult=1.5 * cfg.ffn_dim / cfg.dim, use_mem_delta_rule=False)
    wrapper = InfiniTransformerWrapper(model, segment_length=n, detach_mems_every_num_segments=max(1, seq // n))
    return model, wrapper, "linear rule, eager, full BPTT through its wrapper (backward inside its forward)"


def _train_row(name: str, base: ModelConfig, device: torch.device, sizes: Sizes, ceilings: dict) -> dict:
    """One row of the training table: build, warm up, time `train_iters` steps, count."""
    t, n = sizes.train_seq, sizes.train_segment
    rule = name.removesuffix("+compile")
    clock, mem = Clock(device), PeakMemory(device)
    amp = autocast(device)
    fused = device.type == "cuda"
    mem.reset()
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, base.vocab_size, (1, t + 1), device=device, generator=g)  # random, never zeros
    torch.manual_seed(0)
    note = ""
    if rule == "lucidrains":
        try:
            with torch.device(device):
                model, wrapper, note = lucidrains_model(base, t, n)
        except ImportError:
            return {"name": name, "skipped": "infini-transformer-pytorch is not installed"}
        cfg, flops_rule = base, "linear"

        def fwd_bwd() -> Tensor:
            with amp:
                return wrapper(ids, backward=True)  # splits into segments, backward inside
    else:
        cfg = replace(base, memory="none", segment_len=t) if rule == "full" else replace(base, memory=rule)
        flops_rule = "none" if rule == "full" else rule
        with torch.device(device):
            model = InfiniTransformer(cfg)
        if name.endswith("+compile"):  # regional compilation, as trainer.compile=true
            model.compile_blocks()
            note = "torch.compile per block"

        def fwd_bwd() -> Tensor:
            with amp:
                logits = model(ids[:, :-1]).logits  # (1, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[0, 1:])
            loss.backward()
            return loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def run_steps(count: int) -> tuple[list[float], list[float], Tensor | None]:
        marks, loss = [], None
        for _ in range(count):
            m0 = clock.mark()
            loss = fwd_bwd()
            m1 = clock.mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.append((m0, m1, clock.mark()))
        clock.sync()
        return [clock.ms(a, c) for a, _, c in marks], [clock.ms(a, b) for a, b, _ in marks], loss

    warmup, iters = (sizes.peer_warmup, sizes.peer_iters) if rule == "lucidrains" else (sizes.train_warmup,
                                                                                          sizes.train_iters)
    try:
        run_steps(warmup)
        out_of_memory = False
    except torch.OutOfMemoryError:
        if rule != "lucidrains":
            raise
        out_of_memory = True  # retried below, once the traceback no longer holds the failed step's tensors
    if out_of_memory:
        from infini_transformer_pytorch import InfiniTransformerWrapper

        opt.zero_grad(set_to_none=True)
        free_memory(device)
        mem.reset()
        wrapper = InfiniTransformerWrapper(model, segment_length=n, detach_mems_every_num_segments=2)
        note = "linear rule, eager, memories detached every 2 segments (full BPTT ran out of memory)"
        run_steps(warmup)
    step_ms, fb_ms, loss = run_steps(iters)
    p_all = sum(p.numel() for p in model.parameters())
    p_lin = linear_params(model)
    flops = train_flops(cfg, p_lin, flops_rule, t, cfg.segment_len)
    nbytes = train_bytes(p_all, p_lin, t, cfg.vocab_size)
    med = statistics.median(step_ms)
    row = {"name": name, "rule": flops_rule, "step_ms": med, "step_ms_min": min(step_ms),
           "step_ms_max": max(step_ms), "fwd_bwd_ms": statistics.median(fb_ms), "tokens_per_s": t / (med * 1e-3),
           "tflop_per_step": flops / 1e12, "gb_per_step": nbytes / 1e9, "floor_ms": floor_ms(flops, nbytes, ceilings),
           "mfu": flops / (med * 1e-3) / (ceilings["matmul_tflops"] * 1e12), "params": p_all,
           "linear_params": p_lin, "peak_gib": mem.peak_gib(), "loss": float(loss.detach().float()), "iters": iters,
           "note": note}
    if device.type == "cuda":
        row["mfu_datasheet"] = flops / (med * 1e-3) / (DATASHEET["bf16_tflops"] * 1e12)
    return row


def bench_train(device: torch.device, sizes: Sizes, ceilings: dict, compile_blocks: bool) -> dict:
    """Tokens/s of a full training step (forward, backward, AdamW) for each memory rule and the peer."""
    base = replace(FLAVOURS[sizes.train_flavour], segment_len=sizes.train_segment)
    if sizes.train_kv_heads:
        base = replace(base, n_kv_heads=sizes.train_kv_heads)
    names = list(sizes.train_rules)
    if compile_blocks:
        names += [f"{r}+compile" for r in sizes.train_rules if r in ("none", "linear", "delta")]
    rows = []
    for name in names:
        free_memory(device)
        try:
            rows.append(_train_row(name, base, device, sizes, ceilings))
        except Exception as e:  # one failing row (OOM, a compile error) must not lose the others
            rows.append({"name": name, "error": error_text(e)})
    free_memory(device)
    t, n = sizes.train_seq, sizes.train_segment
    return {"config": {"flavour": sizes.train_flavour, "batch": 1, "seq_len": t, "segment_len": n,
                       "dim": base.dim, "layers": base.n_layers, "heads": f"{base.n_heads} x {base.head_dim}",
                       "kv_heads": base.n_kv_heads, "ffn": base.ffn_dim, "vocab": base.vocab_size,
                       "precision": ("torch.autocast(bfloat16), fp32 parameters, gradients and AdamW state"
                                     if compute_dtype(device) == torch.bfloat16 else "fp32 (CPU)"),
                       "step": "forward + backward + AdamW step (fused on CUDA) + zero_grad; no checkpointing",
                       "warmup": sizes.train_warmup, "iters": sizes.train_iters, "peer_warmup": sizes.peer_warmup,
                       "peer_iters": sizes.peer_iters,
                       "full": "rule none with segment_len = seq_len: one causal SDPA over the whole sequence"},
            "flop_formula": "6 P T + 3 (A + M); P = nn.Linear weights incl. LM head; A = L H T N 2 d (causal "
                            "attention inside segments of N, forward); M = L [2 T d^2 H_kv + T d H_kv + "
                            "2 (T - N) d (d + 1) H] (memory write + read, forward; delta adds "
                            "2 (T - N) d (d + 1) H_kv); MFU = FLOPs / step time / matmul rate measured in this run",
            "rows": rows, "targets": train_targets(rows)}


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name and "step_ms" in r), None)


def train_targets(rows: list[dict]) -> list[dict]:
    targets = []
    for suffix in ("", "+compile"):
        none = _row(rows, "none" + suffix)
        for rule, bound in (("linear", 0.90), ("delta", 0.80)):
            r = _row(rows, rule + suffix)
            if none and r:
                ratio = r["tokens_per_s"] / none["tokens_per_s"]
                targets.append({"target": f"{rule}{suffix} tokens/s >= {bound:.2f} x none{suffix}",
                                "measured": ratio, "met": ratio >= bound})
    best = max((r for r in rows if "mfu" in r and r["rule"] in ("linear", "delta") and r["name"] != "lucidrains"),
               key=lambda r: r["mfu"], default=None)
    if best:
        targets.append({"target": f"MFU >= 40% ({best['name']}, measured matmul rate)", "measured": best["mfu"],
                        "met": best["mfu"] >= 0.40})
    peer = _row(rows, "lucidrains")
    ours = max((r for r in rows if "step_ms" in r and r["rule"] == "linear" and r["name"] != "lucidrains"),
               key=lambda r: r["tokens_per_s"], default=None)
    if peer and ours:
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        targets.append({"target": f"{ours['name']} >= 10 x infini-transformer-pytorch", "measured": ratio,
                        "met": ratio >= 10})
    return targets


# ---------------------------------------------------------------------------------------------- prefill


def prefill_flops(cfg: ModelConfig, p_linear: int, rule: str, t: int, n: int) -> float:
    """Forward FLOPs of a streamed prompt: 2 P T, the LM head only on each segment's last position."""
    p_head = cfg.vocab_size * cfg.dim
    segs = math.ceil(t / n)
    return 2 * (p_linear - p_head) * t + 2 * p_head * segs + attention_flops(cfg, t, n) + memory_flops(cfg, rule, t, n)


def prefill_bytes(cfg: ModelConfig, p_linear: int, t: int, n: int, elt: int) -> float:
    """Every weight read once per segment (the LM head too), the embedding rows of the prompt."""
    return math.ceil(t / n) * p_linear * elt + t * cfg.dim * elt


@torch.inference_mode()
def _stream(model: InfiniTransformer, ids: Tensor) -> Tensor:
    """The model's own segment-streaming forward, keeping only the last logits (constant memory)."""
    out = None
    for out in model.segments(ids, last_only=True):
        pass
    return out.logits


@torch.inference_mode()
def _whole(model: InfiniTransformer, ids: Tensor) -> Tensor:
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

    def measure(name: str, model: InfiniTransformer, fn: Callable[[Tensor], Tensor], t: int, rule: str,
                n: int, reps: int) -> None:
        free_memory(device)
        ids = torch.randint(0, base.vocab_size, (1, t), device=device, generator=g)
        mem.reset()
        before = mem.allocated_gib()
        try:
            secs = [x / 1e3 for x in time_ms(lambda: fn(ids), clock, warmup=0, iters=reps)]
        except Exception as e:
            rows.append({"name": name, "length": t, "error": error_text(e)})
            return
        p_lin = linear_params(model)
        flops = prefill_flops(model.cfg, p_lin, rule, t, n)
        nbytes = prefill_bytes(model.cfg, p_lin, t, n, elt)
        s = statistics.median(secs)
        peak = mem.peak_gib()
        rows.append({"name": name, "length": t, "seconds": s, "tokens_per_s": t / s, "tflop": flops / 1e12,
                     "gb": nbytes / 1e9, "floor_s": floor_ms(flops, nbytes, ceilings) / 1e3,
                     "mfu": flops / s / (ceilings["matmul_tflops"] * 1e12), "peak_gib": peak,
                     "above_weights_gib": None if peak is None else peak - before, "reps": reps})

    names = prefill_names(sizes, compile_blocks)
    for name in names:
        rule = name.removesuffix("+compile")
        torch.manual_seed(0)
        with torch.device(device):
            model = build_model(base, memory=rule).to(dtype).eval()
        if name.endswith("+compile"):
            model.compile_blocks()
        # Warm-up: a first segment (no memory yet) and a second one (with memory), the two shapes streamed.
        _stream(model, torch.randint(0, base.vocab_size, (1, 2 * base.segment_len), device=device))
        for t in sizes.prefill_lengths:
            measure(name, model, partial(_stream, model), t, rule, base.segment_len, reps=3 if t <= 131072 else 1)
        model = None
    # Plain causal attention over the whole prompt: rule none with one segment as long as the prompt.
    longest = max(sizes.prefill_lengths + sizes.full_lengths)
    torch.manual_seed(0)
    with torch.device(device):
        full = build_model(base, memory="none", segment_len=longest).to(dtype).eval()
    _whole(full, torch.randint(0, base.vocab_size, (1, min(sizes.full_lengths)), device=device))  # warm-up
    for t in sizes.full_lengths:
        measure("full", full, partial(_whole, full), t, "none", t, reps=3 if t <= 32768 else 2)
    full = None
    free_memory(device)
    rows += extrapolate_full(rows, sizes.prefill_lengths)
    return {"config": {"flavour": sizes.prefill_flavour, "batch": 1, "segment_len": base.segment_len,
                       "dim": base.dim, "layers": base.n_layers, "heads": f"{base.n_heads} x {base.head_dim}",
                       "kv_heads": base.n_kv_heads, "ffn": base.ffn_dim, "vocab": base.vocab_size,
                       "precision": f"model.to({str(dtype).removeprefix('torch.')}), memory state fp32, "
                                    "torch.inference_mode",
                       "stream": "InfiniTransformer.segments(ids, last_only=True): one segment at a time",
                       "full": "rule none, segment_len >= prompt: one causal SDPA (flash) per layer"},
            "flop_formula": "2 (P - P_head) T + 2 P_head S + A + M (forward only; the LM head runs on each "
                            "segment's last position; A, M as in train)",
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
    """Streamed rows: each rule, and each rule with its blocks compiled."""
    return list(sizes.prefill_rules) + ([f"{r}+compile" for r in sizes.prefill_rules] if compile_blocks else [])


def prefill_targets(rows: list[dict], sizes: Sizes, names: list[str]) -> list[dict]:
    targets = []
    big, small = max(sizes.prefill_lengths), min(sizes.prefill_lengths)
    fulls = {r["length"]: r for r in rows if r["name"].startswith("full") and "seconds" in r}
    for rule in names:
        by_len = {r["length"]: r for r in rows if r["name"] == rule and "seconds" in r}
        if big not in by_len:
            continue
        r = by_len[big]
        if big == 1048576:
            targets.append({"target": f"{rule}: stream 1M in <= 12 s", "measured": r["seconds"],
                            "met": r["seconds"] <= 12})
        if small in by_len and r["peak_gib"] is not None:
            ratio = r["peak_gib"] / by_len[small]["peak_gib"]
            targets.append({"target": f"{rule}: peak memory at {length_label(big)} <= 1.05 x at {length_label(small)}",
                            "measured": ratio, "met": ratio <= 1.05})
        if big in fulls:
            speedup = fulls[big]["seconds"] / r["seconds"]
            how = " (extrapolated)" if "extrapolated" in fulls[big] else ""
            targets.append({"target": f"{rule}: >= 10 x faster than full attention at {length_label(big)}{how}",
                            "measured": speedup, "met": speedup >= 10})
    return targets


# ---------------------------------------------------------------------------------------------- decode


def decode_cost(cfg: ModelConfig, p_linear: int, cache_len: int, elt: int) -> tuple[float, float]:
    """FLOPs and fewest bytes of one decode step (B = 1): every weight read once, the cache, the memory."""
    flops = (2 * p_linear + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache_len
             + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (cfg.head_dim + 1))
    nbytes = (p_linear * elt + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_len * elt
              + cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (cfg.head_dim + 1) * 4 + cfg.dim * elt)
    return flops, nbytes


def bench_decode(device: torch.device, sizes: Sizes, ceilings: dict) -> dict:
    """Per-token latency after prompts of growing length, across one segment boundary (a memory write): the
    eager decode_step, and the StaticDecoder step (a CUDA graph on a GPU, the same fixed-shape step run
    eagerly on the CPU)."""
    from infini_bench.generate import StaticDecoder, decode_step, prefill

    clock, mem = Clock(device), PeakMemory(device)
    cfg = replace(FLAVOURS[sizes.decode_flavour], memory=sizes.decode_rule)
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
    return {"config": {"flavour": sizes.decode_flavour, "rule": sizes.decode_rule, "batch": 1, "segment_len": n,
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


# ---------------------------------------------------------------------------------------------- report


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0 or not math.isfinite(x):
            return str(x)
        if abs(x) >= 1e5:
            return f"{x:,.0f}"
        return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"
    return str(x)


def table(rows: list[dict], cols: list[tuple[str, str | Callable[[dict], Any]]]) -> str:
    """A markdown table (also readable as plain text); rows with an error or skip say so in one cell."""
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r or "skipped" in r:
            first = cols[0][1](r) if callable(cols[0][1]) else r.get(cols[0][1])
            lines.append(f"| {fmt(first)} | " + ("error: " + r["error"] if "error" in r else "skipped: " + r["skipped"])
                         + " |" + " |" * (len(cols) - 2))
            continue
        cells = [c(r) if callable(c) else r.get(c) for _, c in cols]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def targets_table(targets: list[dict]) -> str:
    if not targets:
        return "_No target could be evaluated in this run._"
    return table(targets, [("target", "target"), ("measured", lambda r: fmt(r["measured"])),
                           ("met", lambda r: "**yes**" if r["met"] else "no")])


def render_train(sec: dict) -> str:
    def vs_none(r: dict) -> float | None:
        ref = _row(sec["rows"], "none+compile" if r["name"].endswith("+compile") else "none")
        return r["tokens_per_s"] / ref["tokens_per_s"] if ref else None

    cfg = sec["config"]
    rows = table(sec["rows"], [
        ("row", "name"), ("step ms", "step_ms"), ("fwd+bwd ms", "fwd_bwd_ms"), ("tokens/s", "tokens_per_s"),
        ("x none", vs_none), ("TFLOP/step", "tflop_per_step"), ("floor ms", "floor_ms"),
        ("MFU (measured peak)", lambda r: pct(r.get("mfu"))),
        ("MFU (989 TFLOP/s)", lambda r: pct(r.get("mfu_datasheet"))),
        ("peak GiB", "peak_gib"), ("note", "note")])
    return (f"Config: `{cfg['flavour']}`, {cfg['layers']} layers, {cfg['heads']} heads, FFN {cfg['ffn']}, vocab "
            f"{cfg['vocab']}, B = {cfg['batch']}, T = {cfg['seq_len']}, N = {cfg['segment_len']}. "
            f"Precision: {cfg['precision']}. Step: {cfg['step']}. Median of {cfg['iters']} steps after "
            f"{cfg['warmup']} warm-up (the peer: {cfg.get('peer_iters')} after {cfg.get('peer_warmup')}). `full`: {cfg['full']}.\n\n{rows}\n\nFLOPs: {sec['flop_formula']}.\n\n"
            f"{targets_table(sec['targets'])}\n")


def render_prefill(sec: dict) -> str:
    cfg = sec["config"]
    rows = table(sec["rows"], [
        ("row", "name"), ("tokens", lambda r: length_label(r["length"])), ("seconds", "seconds"),
        ("tokens/s", "tokens_per_s"), ("TFLOP", "tflop"), ("floor s", "floor_s"), ("MFU", lambda r: pct(r.get("mfu"))),
        ("peak GiB", "peak_gib"), ("above weights GiB", "above_weights_gib"), ("note", "extrapolated")])
    return (f"Config: `{cfg['flavour']}` (random init), {cfg['layers']} layers, {cfg['heads']} heads, "
            f"{cfg['kv_heads']} kv heads, FFN {cfg['ffn']}, N = {cfg['segment_len']}. Precision: {cfg['precision']}. "
            f"Stream: {cfg['stream']}. Full: {cfg['full']}.\n\n{rows}\n\nFLOPs: {sec['flop_formula']}.\n\n"
            f"{targets_table(sec['targets'])}\n")


def render_decode(sec: dict) -> str:
    cfg = sec["config"]
    rows = table(sec["rows"], [
        ("step", lambda r: r.get("step", "eager")), ("context", lambda r: length_label(r["context"])),
        ("median ms/token", "median_ms"), ("mean ms", "mean_ms"),
        ("p90 ms", "p90_ms"), ("max ms", "max_ms"), ("floor ms", "floor_ms"), ("prompt s", "prefill_s"),
        ("peak GiB", "peak_gib")])
    return (f"Config: `{cfg['flavour']}` (random init), rule {cfg['rule']}, B = {cfg['batch']}, "
            f"N = {cfg['segment_len']}. Precision: {cfg['precision']}. Step: {cfg['step']}; {cfg['steps']}.\n\n"
            f"{rows}\n\nCost per token: {sec['cost_formula']}.\n\n{targets_table(sec['targets'])}\n")


TITLES = {"train": "Training throughput", "prefill": "Streaming prefill", "decode": "Decode latency"}
RENDER = {"train": render_train, "prefill": render_prefill, "decode": render_decode}
HEADER = ("# Benchmarks\n\nWritten by `bench/bench.py` (`make bench`). Each section carries the command, date, "
          "device and versions that produced it; text outside the `<!-- bench:... -->` markers is kept when the "
          "sections are rewritten.\n")


def render_section(name: str, sec: dict) -> str:
    m, c = sec["meta"], sec["ceilings"]
    sheet = c.get("datasheet")
    ceil = (f"Ceilings measured in the same run: {fmt(c['matmul_tflops'])} TFLOP/s ({c['matmul']} matmul), "
            f"{fmt(c['copy_tb_s'])} TB/s ({c['copy']})"
            + (f"; datasheet {sheet['bf16_tflops']:.0f} TFLOP/s, {sheet['hbm_tb_s']} TB/s." if sheet else "."))
    body = RENDER[name](sec)
    return (f"<!-- bench:{name}:begin -->\n## {TITLES[name]}{' (tiny, CPU mode)' if m['tiny'] else ''}\n\n"
            f"- command: `{m['command']}`\n- date: {m['date']}\n- device: {m['device']}\n- versions: {m['versions']}\n"
            f"- {ceil}\n\n{body}\n<!-- bench:{name}:end -->\n")


def write_markdown(path: Path, data: dict) -> None:
    """Replace each marked section present in `data` in place, or append it; keep everything else."""
    text = path.read_text() if path.exists() else HEADER
    for name in SECTIONS:
        if name not in data:
            continue
        block = render_section(name, data[name])
        pattern = re.compile(rf"<!-- bench:{name}:begin -->.*?<!-- bench:{name}:end -->\n?", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def print_summary(name: str, sec: dict) -> None:
    print(f"\n== {TITLES[name]} ({sec['meta']['device']}) ==")
    print(RENDER[name](sec))


# ---------------------------------------------------------------------------------------------- main


def meta(device: torch.device, command: str, tiny: bool) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        versions += f", CUDA {torch.version.cuda}"
        try:
            import triton

            versions += f", triton {triton.__version__}"
        except ImportError:
            pass
    return {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": name, "versions": versions, "tiny": tiny}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n")[0])
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"what to measure: {', '.join(SECTIONS)} or all; none: only render --out into --write-md")
    p.add_argument("--out", type=Path, default=Path("results/bench.json"), help="JSON results (merged per section)")
    p.add_argument("--write-md", type=Path, help="markdown file whose bench sections are (re)written")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the default device")
    p.add_argument("--compile", action="store_true", help="add rows whose blocks are torch.compile'd")
    p.add_argument("--compile-sections", default="train,prefill", help="where --compile adds rows")
    p.add_argument("--train-rules", help="comma list of none,linear,delta,full,lucidrains")
    p.add_argument("--seq-len", type=int, help="training sequence length")
    p.add_argument("--segment-len", type=int, help="training segment length")
    p.add_argument("--iters", type=int, help="timed training steps")
    p.add_argument("--prefill-lengths", help="comma list of streamed prompt lengths")
    p.add_argument("--full-lengths", help="comma list of lengths for plain full attention")
    p.add_argument("--decode-contexts", help="comma list of decode context lengths")
    args = p.parse_args(argv)
    bad = [x for x in args.sections if x not in (*SECTIONS, "all")]
    if bad:
        p.error(f"section {bad[0]!r} is not one of {', '.join(SECTIONS)}, all")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    s = Sizes.tiny() if args.cpu or args.tiny else Sizes()
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    over = {"train_rules": args.train_rules and tuple(args.train_rules.split(",")), "train_seq": args.seq_len,
            "train_segment": args.segment_len, "train_iters": args.iters,
            "prefill_lengths": args.prefill_lengths and ints(args.prefill_lengths),
            "full_lengths": args.full_lengths and ints(args.full_lengths),
            "decode_contexts": args.decode_contexts and ints(args.decode_contexts)}
    return replace(s, **{k: v for k, v in over.items() if v})


def main(argv: list[str] | None = None) -> dict:
    """Run the sections named on the command line, then render; returns the merged results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sections = list(SECTIONS) if "all" in args.sections else [s for s in SECTIONS if s in args.sections]
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    threads = torch.get_num_threads()
    if sections and args.cpu:  # tiny ops gain nothing from threads, and on a busy machine spinning ones cost 50x
        torch.set_num_threads(1)
    try:
        if sections:
            run_sections(args, argv, sections, data)
    finally:
        torch.set_num_threads(threads)
    if args.write_md:
        write_markdown(args.write_md, data)
    return data


def run_sections(args: argparse.Namespace, argv: list[str], sections: list[str], data: dict) -> None:
    """Measure the ceilings once, then each section; the JSON is rewritten after every section."""
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    sizes = sizes_from(args)
    info = meta(device, "python -m bench.bench " + " ".join(shlex.quote(a) for a in argv), args.cpu or args.tiny)
    ceilings = measure_ceilings(device, sizes, compute_dtype(device))
    print(f"device: {info['device']}; {info['versions']}; matmul {fmt(ceilings['matmul_tflops'])} TFLOP/s, "
          f"copy {fmt(ceilings['copy_tb_s'])} TB/s")
    for name in sections:
        t0 = time.perf_counter()
        if name == "train":
            sec = bench_train(device, sizes, ceilings, args.compile and "train" in args.compile_sections)
        elif name == "prefill":
            sec = bench_prefill(device, sizes, ceilings, args.compile and "prefill" in args.compile_sections)
        else:
            sec = bench_decode(device, sizes, ceilings)
        sec = {"meta": {**info, "wall_s": time.perf_counter() - t0}, "ceilings": ceilings, **sec}
        data[name] = sec
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))  # after every section: a later crash keeps it
        print_summary(name, sec)


if __name__ == "__main__":
    main()

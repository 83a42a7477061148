"""The training section: tokens/s of forward + backward + AdamW for every registered memory (full attention
among them) and the public infini-transformer-pytorch."""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (DATASHEET, PEER, Clock, PeakMemory, Sizes, compute_dtype, error_text, floor_ms,
                          free_memory, memory_args_used, with_memory)
from bench.flops import linear_params, train_bytes, train_flops
from infini_bench.model import SegmentTransformer
from infini_bench.model_config import FLAVOURS, ModelConfig
from infini_bench.train import autocast

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
    memory = name.removesuffix("+compile")
    clock, mem = Clock(device), PeakMemory(device)
    amp = autocast(device, "auto")  # bf16 on a GPU, fp32 on a CPU (compute_dtype)
    fused = device.type == "cuda"
    mem.reset()
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, base.vocab_size, (1, t + 1), device=device, generator=g)  # random, never zeros
    torch.manual_seed(0)
    note = ""
    if memory == PEER:
        cfg = with_memory(base, "linear", sizes)  # its memory, counted by our formula
        try:
            with torch.device(device):
                model, wrapper, note = lucidrains_model(cfg, t, n)
        except ImportError:
            return {"name": name, "skipped": "infini-transformer-pytorch is not installed"}

        def fwd_bwd() -> Tensor:
            with amp:
                return wrapper(ids, backward=True)  # splits into segments, backward inside
    else:
        cfg = with_memory(base, memory, sizes)
        with torch.device(device):
            model = SegmentTransformer(cfg)
        if name.endswith("+compile"):  # regional compilation, as trainer.compile=true
            model.compile_blocks(**({"mode": sizes.compile_mode} if sizes.compile_mode else {}))
            note = "torch.compile per segment (all blocks)" if model.stack_memory is not None else \
                "torch.compile per block"
            if sizes.compile_mode:
                note += f", mode={sizes.compile_mode}"

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

    warmup, iters = (sizes.peer_warmup, sizes.peer_iters) if memory == PEER else (sizes.train_warmup,
                                                                                    sizes.train_iters)
    try:
        run_steps(warmup)
        out_of_memory = False
    except torch.OutOfMemoryError:
        if memory != PEER:
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
    flops = train_flops(cfg, p_lin, t)
    nbytes = train_bytes(p_all, p_lin, t, cfg.vocab_size)
    med = statistics.median(step_ms)
    row = {"name": name, "memory": cfg.memory, "step_ms": med, "step_ms_min": min(step_ms),
           "step_ms_max": max(step_ms), "fwd_bwd_ms": statistics.median(fb_ms), "tokens_per_s": t / (med * 1e-3),
           "tflop_per_step": flops / 1e12, "gb_per_step": nbytes / 1e9, "floor_ms": floor_ms(flops, nbytes, ceilings),
           "mfu": flops / (med * 1e-3) / (ceilings["matmul_tflops"] * 1e12), "params": p_all,
           "linear_params": p_lin, "peak_gib": mem.peak_gib(), "loss": float(loss.detach().float()), "iters": iters,
           "note": note}
    if device.type == "cuda":
        row["mfu_datasheet"] = flops / (med * 1e-3) / (DATASHEET["bf16_tflops"] * 1e12)
    return row


def bench_train(device: torch.device, sizes: Sizes, ceilings: dict, compile_blocks: bool) -> dict:
    """Tokens/s of a full training step (forward, backward, AdamW) for each memory and the peer."""
    base = replace(FLAVOURS[sizes.train_flavour], segment_len=sizes.train_segment)
    if sizes.train_kv_heads:
        base = replace(base, n_kv_heads=sizes.train_kv_heads)
    names = list(sizes.train_memories)
    if compile_blocks:
        names += [f"{m}+compile" for m in sizes.train_memories if m != PEER]
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
                       "full": "memory full: one causal SDPA over the whole sequence",
                       "memory_args": memory_args_used(names, sizes)},
            "flop_formula": "3 (2 P R + 4 d H L pairs + memory) + kNN selection + 2 (XL's K, V recomputed); "
                            "P = nn.Linear weights incl. LM head, R = rows (T; RMT T + 2m per segment), pairs = "
                            "(query, key) pairs each memory's mask allows per head and layer (causal inside "
                            "segments of N; + min(mem_len, p) cached keys for txl and memorizing; RMT's mask over "
                            "N + 2m rows; full: causal over T), memory = compressive read + write (linear, delta) "
                            "or memorizing's top-k attention, all forward (bench/flops.py); MFU = FLOPs / step "
                            "time / matmul rate measured in this run",
            "rows": rows, "targets": train_targets(rows)}


def measured_row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name and "step_ms" in r), None)


# Tokens/s each memory should reach against `none`, compiled rows against none+compile (eager rows only when
# the run has no compiled ones), and the MFU linear+compile should reach at the matmul rate measured in the run.
TARGETS = (("linear", 0.92), ("delta", 0.85), ("txl", 0.75), ("memorizing", 0.50), ("rmt", 0.60))
MFU_TARGET = 0.55


def train_targets(rows: list[dict]) -> list[dict]:
    targets = []
    suffix = "+compile" if measured_row(rows, "none+compile") else ""
    none = measured_row(rows, "none" + suffix)
    for memory, bound in TARGETS:
        r = measured_row(rows, memory + suffix)
        if none and r:
            ratio = r["tokens_per_s"] / none["tokens_per_s"]
            targets.append({"target": f"{memory}{suffix} tokens/s >= {bound:.2f} x none{suffix}",
                            "measured": ratio, "met": ratio >= bound})
    linear = measured_row(rows, "linear" + suffix)
    if linear:
        targets.append({"target": f"MFU of linear{suffix} >= {MFU_TARGET:.0%} (measured matmul rate)",
                        "measured": linear["mfu"], "met": linear["mfu"] >= MFU_TARGET})
    peer = measured_row(rows, PEER)
    ours = max((r for r in rows if "step_ms" in r and r["memory"] == "linear" and r["name"] != PEER),
               key=lambda r: r["tokens_per_s"], default=None)
    if peer and ours:
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        targets.append({"target": f"{ours['name']} >= 10 x infini-transformer-pytorch", "measured": ratio,
                        "met": ratio >= 10})
    return targets

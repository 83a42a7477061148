"""What every benchmark section shares: the sizes of a run, precision, timing, peak memory, the ceilings."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import torch

from infini_bench.memories import memory_class, memory_names, resolve_args
from infini_bench.model_config import FLAVOURS, ModelConfig

SECTIONS = ("train", "prefill", "decode")
PEER = "lucidrains"  # the public infini-transformer-pytorch: a training row, not a registered memory
DATASHEET = {"device": "H200 SXM", "bf16_tflops": 989.0, "hbm_tb_s": 4.8}  # dense bf16, HBM3e (vendor)
GIB = 2**30


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, as the paper's runs; fp32 on a CPU, where bf16 matrix products are emulated and slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def registered_memories() -> tuple[str, ...]:
    """Every registered memory, in the registry's order: a newly registered one gets its rows without a change here."""
    return tuple(memory_names())


def streaming_memories() -> tuple[str, ...]:
    """The memories a prompt is streamed through, segment by segment: all but `none` (nothing to carry) and
    those that ignore segments (full attention, which has its own prefill rows)."""
    return tuple(m for m in registered_memories() if m != "none" and not memory_class(m).whole_sequence)


@dataclass
class Sizes:
    """Every size one run uses. The defaults fit one H200; `tiny()` runs on a 2-core CPU."""

    # train: paper Table 2 LM (12 layers, 8 x 128 heads, FFN 4096, 32K vocabulary), B = 1, T = 32K, N = 2K
    train_flavour: str = "lm_paper"
    train_seq: int = 32768
    train_segment: int = 2048
    train_memories: tuple[str, ...] = field(default_factory=lambda: (*registered_memories(), PEER))
    train_kv_heads: int | None = None  # None: the flavour's; the peer has no GQA, so tiny runs MHA
    train_warmup: int = 3
    train_iters: int = 10
    compile_mode: str | None = None  # torch.compile's mode for the +compile training rows (None: its default)
    peer_warmup: int = 1  # the peer is ~10x slower and only compared against a 10x bound
    peer_iters: int = 3
    # prefill: the Llama-3.2-1B shape, random init, bf16 weights, streamed one segment at a time
    prefill_flavour: str = "1b"
    prefill_memories: tuple[str, ...] = field(default_factory=streaming_memories)
    prefill_lengths: tuple[int, ...] = (32768, 131072, 1048576)
    full_lengths: tuple[int, ...] = (32768, 131072)  # plain causal attention; longer ones are extrapolated
    # decode: per-token latency of the 1B shape after a streamed prompt
    decode_flavour: str = "1b"
    decode_memory: str = "linear"
    decode_contexts: tuple[int, ...] = (4096, 1048576)
    decode_steps: int = 64
    # memory_args per memory name (None: the memory's defaults, the paper's comparison sizes)
    memory_args: dict[str, dict] = field(default_factory=dict)
    # ceilings
    matmul_n: int = 8192
    copy_mib: int = 2048

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(train_flavour="tiny", train_kv_heads=FLAVOURS["tiny"].n_heads, train_seq=256, train_segment=64,
                   train_warmup=1, train_iters=2, peer_iters=2, prefill_flavour="tiny", prefill_lengths=(256, 512, 1024),
                   full_lengths=(256, 512),
                   decode_flavour="tiny", decode_contexts=(128, 1024), decode_steps=8, matmul_n=512,
                   copy_mib=32,
                   # a store shorter than the longest prompt (the cap is reached), memory tokens in scale with N
                   memory_args={"memorizing": {"knn_size": 256}, "rmt": {"num_mem_tokens": 8}})


def with_memory(cfg: ModelConfig, name: str, sizes: Sizes) -> ModelConfig:
    """cfg with memory `name` and this run's parameters for it."""
    return replace(cfg, memory=name, memory_args=sizes.memory_args.get(name))


def memory_args_used(names: list[str], sizes: Sizes) -> dict[str, dict]:
    """Every registered memory among `names` with its parameters as resolved (defaults filled in)."""
    names = [m.removesuffix("+compile") for m in names]
    return {m: resolve_args(m, sizes.memory_args.get(m)) for m in dict.fromkeys(names) if m in memory_names()}


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


def floor_ms(flops: float, nbytes: float, ceilings: dict) -> float:
    """The larger of compute time at the measured matmul rate and byte time at the measured copy rate."""
    return max(flops / (ceilings["matmul_tflops"] * 1e12), nbytes / (ceilings["copy_tb_s"] * 1e12)) * 1e3

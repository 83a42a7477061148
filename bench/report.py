"""The markdown report: one marked section per benchmark, rewritten in place in docs/BENCHMARKS.md."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

from bench.common import SECTIONS
from bench.train import measured_row
from infini_bench.paper import length_label

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


def memory_args_text(cfg: dict) -> str:
    """The memories' parameters of a section, as one sentence (empty for results written without them)."""
    parts = [f"{m} ({', '.join(f'{k}={v}' for k, v in args.items())})"
             for m, args in (cfg.get("memory_args") or {}).items() if args]
    return f" Memory parameters: {'; '.join(parts)}." if parts else ""


def render_train(sec: dict) -> str:
    def vs_none(r: dict) -> float | None:
        ref = measured_row(sec["rows"], "none+compile" if r["name"].endswith("+compile") else "none")
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
            f"{cfg['warmup']} warm-up (the peer: {cfg.get('peer_iters')} after {cfg.get('peer_warmup')}). `full`: {cfg['full']}.{memory_args_text(cfg)}\n\n{rows}\n\nFLOPs: {sec['flop_formula']}.\n\n"
            f"{targets_table(sec['targets'])}\n")


def render_prefill(sec: dict) -> str:
    cfg = sec["config"]
    rows = table(sec["rows"], [
        ("row", "name"), ("tokens", lambda r: length_label(r["length"])), ("seconds", "seconds"),
        ("tokens/s", "tokens_per_s"), ("TFLOP", "tflop"), ("floor s", "floor_s"), ("MFU", lambda r: pct(r.get("mfu"))),
        ("peak GiB", "peak_gib"), ("above weights GiB", "above_weights_gib"), ("note", "extrapolated")])
    return (f"Config: `{cfg['flavour']}` (random init), {cfg['layers']} layers, {cfg['heads']} heads, "
            f"{cfg['kv_heads']} kv heads, FFN {cfg['ffn']}, N = {cfg['segment_len']}. Precision: {cfg['precision']}. "
            f"Stream: {cfg['stream']}. Full: {cfg['full']}.{memory_args_text(cfg)}\n\n{rows}\n\nFLOPs: {sec['flop_formula']}.\n\n"
            f"{targets_table(sec['targets'])}\n")


def render_decode(sec: dict) -> str:
    cfg = sec["config"]
    rows = table(sec["rows"], [
        ("step", lambda r: r.get("step", "eager")), ("context", lambda r: length_label(r["context"])),
        ("median ms/token", "median_ms"), ("mean ms", "mean_ms"),
        ("p90 ms", "p90_ms"), ("max ms", "max_ms"), ("floor ms", "floor_ms"), ("prompt s", "prefill_s"),
        ("peak GiB", "peak_gib")])
    memory = cfg.get("memory", cfg.get("rule"))  # results written before the rename say "rule"
    return (f"Config: `{cfg['flavour']}` (random init), memory {memory}, B = {cfg['batch']}, "
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

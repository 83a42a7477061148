"""Benchmarks, measured side by side in one run: training throughput, streaming prefill, decode.

    python -m bench.bench all --out results/bench.json --write-md docs/BENCHMARKS.md   # one H200
    python -m bench.bench all --compile --out results/bench.json                      # + compiled rows
    python -m bench.bench --cpu all --out /tmp/bench.json --write-md /tmp/BENCH.md    # tiny sizes, CI, ~15 s
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
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import (PEER, SECTIONS, Sizes, compute_dtype, measure_ceilings, registered_memories,
                          streaming_memories)
from bench.decode import bench_decode
from bench.prefill import bench_prefill
from bench.report import fmt, print_summary, write_markdown
from bench.train import bench_train
from infini_bench.attention import attention_backends

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


class DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's dest, with a warning on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated, use --{self.dest.replace('_', '-')}", file=sys.stderr)
        setattr(namespace, self.dest, values)


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
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode for the training rows (reduce-overhead: CUDA graphs)")
    train_rows, prefill_rows = (*registered_memories(), PEER), streaming_memories()
    p.add_argument("--train-memories", help=f"comma list of training rows, of {','.join(train_rows)} (default: all)")
    p.add_argument("--train-rules", dest="train_memories", action=DeprecatedAlias,
                   help="deprecated: --train-memories")
    p.add_argument("--prefill-memories",
                   help=f"comma list of streamed rows, of {','.join(prefill_rows)} (default: all)")
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
    for option, accepted in (("train_memories", train_rows), ("prefill_memories", prefill_rows)):
        bad = [m for m in (getattr(args, option) or "").split(",") if m and m not in accepted]
        if bad:
            p.error(f"--{option.replace('_', '-')}: {bad[0]!r} is not one of {', '.join(accepted)}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    s = Sizes.tiny() if args.cpu or args.tiny else Sizes()
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    names = lambda text: text and tuple(text.split(","))  # noqa: E731
    over = {"train_memories": names(args.train_memories), "prefill_memories": names(args.prefill_memories),
            "compile_mode": args.compile_mode, "train_seq": args.seq_len, "train_segment": args.segment_len,
            "train_iters": args.iters,
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
    attention_backends()  # the attention kernels runs use
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

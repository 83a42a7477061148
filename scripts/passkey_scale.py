"""Passkey retrieval streamed at growing lengths: time and peak memory per length (docs/BENCHMARKS.md).

    python scripts/passkey_scale.py --lengths 32768,131072,262144,524288,1048576 --out passkey_scale.json
    python scripts/passkey_scale.py --key-range 1,9 --checkpoint outputs/passkey/<run>/model.safetensors ...

Each sample's prompt goes through the model one segment at a time (`tasks.passkey.evaluate_samples`), so
peak memory must not grow with the length. Prints a markdown table; writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from infini_bench.memories import memory_names  # noqa: E402
from infini_bench.model import build_model  # noqa: E402
from infini_bench.tokenizer import ByteTokenizer  # noqa: E402
from tasks.passkey import evaluate_samples  # noqa: E402
from tasks.passkey_data import DEPTHS, make_sample, summarise  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32768,131072,262144,524288,1048576")
    p.add_argument("--samples", type=int, default=2, help="per length and depth")
    p.add_argument("--memory", default="linear", choices=memory_names())
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--key-range", default="1,50000", help="keys drawn from this range (the tiny default: 1,9)")
    p.add_argument("--checkpoint", type=Path, default=None, help="safetensors of a tiny model (else random init)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = build_model("tiny", memory=args.memory, segment_len=args.segment_len).to(device).eval()
    if args.checkpoint is not None:
        from safetensors.torch import load_model

        load_model(model, str(args.checkpoint), strict=True)
    key_range = tuple(int(x) for x in args.key_range.split(","))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        samples = [make_sample(length, depth, 1000 + i, tokenizer, key_range=key_range) for depth in DEPTHS.values()
                   for i in range(args.samples)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        outcomes = evaluate_samples(model, samples, tokenizer, batch_size=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        s = summarise(outcomes)
        rows.append({"length": length, "samples": len(samples), "seconds": seconds,
                     "seconds_per_sample": seconds / len(samples), "tokens_per_s": length * len(samples) / seconds,
                     "peak_mib": peak, "acc": s["acc"], "exact": s["exact"], "segments_back": s["segments_back"]})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                    "torch": torch.__version__, "memory": args.memory, "segment_len": args.segment_len,
                                    "checkpoint": str(args.checkpoint), "key_range": key_range, "rows": rows}, indent=2))
    print("| length | samples | s/sample | tokens/s | peak MiB | token acc | exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']:,} | {r['samples']} | {r['seconds_per_sample']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_mib']:.1f} | {r['acc']:.3f} | {r['exact']:.3f} |")


if __name__ == "__main__":
    main()

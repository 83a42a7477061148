"""Memorizing's gradients with its blocks compiled, against eager, at table2_mini's shape on one GPU.

    python scripts/memorizing_compile_probe.py OUT          # every variant, one after another, then OUT/summary.json
    PROBE_SMALL=1 python scripts/memorizing_compile_probe.py OUT   # the same at batch 2 x 1,024 on the CPU

Each variant builds `model=lm_mini memory=memorizing` (seed 0, gates drawn from N(0, 1) so the kNN read
matters), runs two forward and backward passes of batch 8 x 8,192 tokens under bf16 autocast, and records
the loss and which parameters got a non-finite gradient; the first pass's gradients are then compared with
the eager model's (relative error per parameter). Variants:

- `eager`: no compilation, the reference;
- `search-eager`: the blocks compiled as `trainer.compile=true` does, the kNN search left eager (the code as
  shipped: `knn_attention` is `torch.compiler.disable`d);
- `search-compiled`: the kNN search and top-k attention compiled with the block;
- `search-compiled-plain`: the same with the top-k attention written with autograd ops instead of
  `TopKAttention`;
- `search-compiled-fp32`: `search-compiled` without autocast.

Each variant runs in a process of its own, capped at 28% of the GPU's memory so runs beside it keep theirs.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infini_bench.memories import memorizing as M  # noqa: E402
from infini_bench.model import build_model  # noqa: E402
from infini_bench.train import autocast, lm_loss  # noqa: E402

VARIANTS = ["search-compiled", "eager", "search-compiled-plain", "search-eager", "search-compiled-fp32"]
SMALL = os.environ.get("PROBE_SMALL") == "1"


def topk_with_autograd(q, keys, values, idx, hit):
    """TopKAttention's forward as ordinary differentiable ops (autograd saves the gathered pairs)."""
    work = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        s = torch.einsum("bhqd,bhqkd->bhqk", q.to(work), M._gather(keys, idx).to(work))
        s = s.masked_fill(~hit, float("-inf"))
        top = s.detach().amax(-1, keepdim=True)
        e = (s - torch.where(torch.isfinite(top), top, 0.0)).exp()
        w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        return torch.einsum("bhqk,bhqkd->bhqd", w, M._gather(values, idx).to(work))


class WithAutograd:
    apply = staticmethod(topk_with_autograd)


def batch(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of repeated printable snippets (repeated contexts give tied keys, as code does)."""
    g = torch.Generator().manual_seed(seed)
    snippets = torch.randint(32, 127, (64, 48), generator=g)
    ids = snippets[torch.randint(0, 64, (b, t // 48 + 1), generator=g)].reshape(b, -1)[:, : t + 1]
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def one(variant: str, out: Path) -> None:
    torch.manual_seed(0)
    dev = torch.device("cpu" if SMALL else "cuda")
    if not SMALL:
        torch.cuda.set_per_process_memory_fraction(0.28)
    b, t = (2, 1024) if SMALL else (8, 8192)
    if variant.startswith("search-compiled"):
        M.knn_attention = M.knn_attention.__wrapped__  # undo torch.compiler.disable
    if variant == "search-compiled-plain":
        M.TopKAttention = WithAutograd
    model = build_model("lm_mini", memory="memorizing").to(dev)
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.gate is not None:
                layer.attn.gate.normal_(0, 1)
    if variant != "eager":
        model.compile_blocks()
    precision = "fp32" if variant.endswith("fp32") else "bf16"
    res, t0 = {"variant": variant, "steps": []}, time.time()
    for step in range(2):
        ids, labels = batch(b, t, step)
        with autocast(dev, precision):
            loss = lm_loss(model, ids.to(dev), labels.to(dev))
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        res["steps"].append({"loss": loss.item(), "non_finite": bad, "n_non_finite": len(bad), "t": time.time() - t0})
        if step == 0:
            torch.save({n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None},
                       out / f"grads-{variant}.pt")
        model.zero_grad(set_to_none=True)
    (out / f"{variant}.json").write_text(json.dumps(res))


def compare(out: Path) -> dict:
    """Each variant's record, and its first-pass gradients against eager's (written after every variant)."""
    summary = {}
    ref_path = out / "grads-eager.pt"
    if ref_path.exists():
        ref = torch.load(ref_path)
        for v in VARIANTS:
            if v != "eager" and (out / f"grads-{v}.pt").exists():
                g = torch.load(out / f"grads-{v}.pt")
                errs = {n: ((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref if n in g}
                finite = {n: e for n, e in errs.items() if e == e}
                summary[f"{v} vs eager"] = {"max_rel": max(finite.values()) if finite else None,
                                            "non_finite_params": len(errs) - len(finite),
                                            "worst": sorted(finite, key=finite.get)[-3:]}
    for v in VARIANTS:
        record, log = out / f"{v}.json", out / f"{v}.log"
        summary[v] = json.loads(record.read_text()) if record.exists() else \
            log.read_text()[-1500:] if log.exists() else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 2:
        return one(sys.argv[2], out)
    for v in VARIANTS:
        with open(out / f"{v}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, str(out), v], stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
        compare(out)
    print(json.dumps(compare(out), indent=1))


if __name__ == "__main__":
    main()

"""Long-document perplexity through the streaming path, with the memory carried through each document."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from infini_bench.documents import Document
from infini_bench.train import autocast


@torch.no_grad()
def evaluate_lm(model: nn.Module, docs: tuple[Document, ...], tokenizer, device: torch.device,
                max_tokens: int | None = None, precision: str = "auto", progress: bool = False) -> dict:
    """Token perplexity and bits per byte over whole documents, and the mean loss at each segment index.

    Each document is streamed one segment at a time: the model never holds more than one segment of
    activations, and segment k is predicted from local attention plus the memory of segments < k. `progress`
    shows a bar of segments that goes away when done, below a training bar if there is one.
    """
    model.eval()
    n = model.cfg.segment_len
    nll_sum, n_tokens, n_bytes = 0.0, 0, 0
    seg_sum: list[float] = []
    seg_count: list[int] = []
    encoded = [tokenizer.encode(doc.text) for doc in docs]
    encoded = [ids[: max_tokens + 1] if max_tokens is not None else ids for ids in encoded]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    bar = tqdm(total=sum(-(-(len(ids) - 1) // n) for ids in encoded), desc="eval", unit=" segments", leave=False,
               dynamic_ncols=True, disable=not progress)
    for ids in encoded:
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        inputs, targets = ids_t[:-1].unsqueeze(0), ids_t[1:]
        states = None
        for k, start in enumerate(range(0, inputs.shape[1], n)):
            with autocast(device, precision):
                out = model(inputs[:, start: start + n], states)
            states = out.states
            tgt = targets[start: start + n]
            nll = F.cross_entropy(out.logits[0].float(), tgt, reduction="sum").item()
            nll_sum += nll
            n_tokens += tgt.numel()
            if k == len(seg_sum):
                seg_sum.append(0.0)
                seg_count.append(0)
            seg_sum[k] += nll
            seg_count[k] += tgt.numel()
            bar.update(1)
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
    bar.close()
    loss = nll_sum / max(n_tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": nll_sum / math.log(2) / max(n_bytes, 1),
        "tokens": n_tokens,
        "loss_by_segment": [s / c for s, c in zip(seg_sum, seg_count)],
    }

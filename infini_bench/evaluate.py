"""Long-document scoring through the streaming path, with the memory carried through each sequence."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from infini_bench.documents import Document
from infini_bench.train import autocast


@torch.no_grad()
def streamed_logits(model: nn.Module, input_ids: Tensor, precision: str = "auto",
                    carry: bool = True) -> Iterator[Tensor]:
    """Per segment, its logits (B, n, V), the sequence streamed one segment at a time: the model never holds more
    than one segment of activations, and segment k is predicted from local attention plus the memory of segments
    < k. The one loop behind every teacher-forced score (`streamed_nll`, `streamed_hits`). With carry=False every
    segment starts from an empty memory, as a document's first does: the ablation that shows what the memory adds."""
    n = model.cfg.segment_len
    states = None
    for start in range(0, input_ids.shape[1], n):
        with autocast(input_ids.device, precision):
            out = model(input_ids[:, start: start + n], states)
        states = out.states if carry else None
        yield out.logits


@torch.no_grad()
def streamed_nll(model: nn.Module, input_ids: Tensor, labels: Tensor, precision: str = "auto"
                 ) -> Iterator[tuple[float, int]]:
    """Per segment, the summed negative log-likelihood of its labelled tokens and their count.

    input_ids and labels (B, T), on the model's device; labels[:, t] is the target of position t, -100 where
    nothing is scored. Streamed by `streamed_logits`, in constant memory.
    """
    n = model.cfg.segment_len
    for k, logits in enumerate(streamed_logits(model, input_ids, precision)):
        target = labels[:, k * n: (k + 1) * n]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
        yield nll.item(), int((target != -100).sum())


@torch.no_grad()
def streamed_hits(model: nn.Module, input_ids: Tensor, labels: Tensor, precision: str = "auto") -> Tensor:
    """(B, T) bool: whether the argmax at position t is labels[:, t] (never where labels is -100), streamed by
    `streamed_logits`: exact-match accuracy per token, for tasks scored on a few answer tokens."""
    return torch.cat([logits.argmax(-1) for logits in streamed_logits(model, input_ids, precision)], dim=1) == labels


@torch.no_grad()
def evaluate_lm(model: nn.Module, docs: tuple[Document, ...], tokenizer, device: torch.device,
                max_tokens: int | None = None, precision: str = "auto", progress: bool = False) -> dict:
    """Token perplexity and bits per byte over whole documents, and the mean loss at each segment index.

    Each document is scored by `streamed_nll`, in constant memory whatever its length. `progress` shows a bar of
    segments that goes away when done, below a training bar if there is one.
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
        for k, (nll, count) in enumerate(streamed_nll(model, ids_t[None, :-1], ids_t[None, 1:], precision)):
            nll_sum += nll
            n_tokens += count
            if k == len(seg_sum):
                seg_sum.append(0.0)
                seg_count.append(0)
            seg_sum[k] += nll
            seg_count[k] += count
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

"""Does a trained booksum run's memory carry the events its summaries need? An ablation on held-out books.

    python scripts/booksum_memory_probe.py RUN_DIR [RUN_DIR ...] [--out probe.json]

For each run (a folder with results.json and model.safetensors, synthetic books), the reference summary of every
evaluation book is scored by teacher forcing on the whole book twice: with the memory carried from segment to
segment, as in training, and with it wiped before every segment (each starts as a document's first does). Each
summary token is put in one class by where the event it belongs to lies, seen from the segment that predicts it:

- memory: the event ends in an earlier segment, so only the memory can bring it;
- local: the whole event is in the predicting segment, within local attention's reach;
- split: the event straddles the boundary into the predicting segment;
- other: the spaces between events and the end-of-summary token.

Per class: the token count, the mean loss (nats) and the share of tokens the argmax predicts, carried and wiped.
A memory that carries events makes the memory class's carried loss lower than its wiped loss; a memory that
carries nothing leaves them equal (for memory=none they are equal by construction).

For Infini-attention's linear memory it also says where each read draws from. Its read at a query q is
sum_i w_i v_i over every earlier segment's tokens i, with w_i = sigma(q) sigma(k_i) / sum_j sigma(q) sigma(k_j)
(Eq. 7 written out, `kernel_weights`). For each memory-class token, per layer and head: the weight on its event's
tokens divided by their share of the tokens written (`read_focus`). 1 is a read that does not single the event out
among the filler; a read focused on the event scores up to 1 / share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infini_bench.compressive import sigma  # noqa: E402
from infini_bench.evaluate import streamed_logits  # noqa: E402
from infini_bench.tracking import write_json  # noqa: E402
from tasks.booksum import Example, event_spans, framing_tokens, make_batch, synthetic_books, truncate  # noqa: E402
from tasks.runner import build_model_and_tokenizer  # noqa: E402

CLASSES = ("memory", "local", "split", "other")


def event_of(summary_spans: list[tuple[int, int]], j: int) -> int | None:
    """The event whose span in the summary holds its token j, or None (a space between events, or EOS)."""
    return next((e for e, (a, b) in enumerate(summary_spans) if a <= j < b), None)


def token_classes(book_spans: list[tuple[int, int]], summary_spans: list[tuple[int, int]], first_summary: int,
                  n_summary: int, offset: int, segment_len: int) -> list[str]:
    """The class (CLASSES) of each of n_summary + 1 scored tokens (the summary, then EOS).

    book_spans: each event's token span in the book, summary_spans: in the summary (both [start, end), in event
    order); the book's token i is at sequence position offset + i, the summary's token j at first_summary + j and
    is predicted from position first_summary + j - 1. An event truncated out of the book has no span (None)."""
    classes = []
    for j in range(n_summary + 1):
        seg = (first_summary + j - 1) // segment_len  # the segment of the position that predicts token j
        e = event_of(summary_spans, j)
        if e is None or book_spans[e] is None:
            classes.append("other")
            continue
        a, b = book_spans[e]
        if (offset + b - 1) // segment_len < seg:
            classes.append("memory")
        elif (offset + a) // segment_len == seg:
            classes.append("local")
        else:
            classes.append("split")
    return classes


def kernel_weights(q: Tensor, k: Tensor) -> Tensor:
    """The linear memory's read as weights over the tokens it holds: q (H, D) un-rotated queries, k (H_kv, P, D)
    the un-rotated keys of P tokens written -> (H, P), each row summing to 1 (query heads grouped onto kv heads)."""
    h, hk = q.shape[0], k.shape[0]
    w = torch.einsum("hd,hpd->hp", sigma(q.float()), sigma(k.float()).repeat_interleave(h // hk, dim=0))
    return w / w.sum(-1, keepdim=True)


def key_sums(ks: list[Tensor]) -> list[Tensor]:
    """Per layer, the running sums of sigma(k) over the sequence: (H_kv, T + 1, D) float64, [:, p] the sum over the
    first p tokens. With them the read's weight on any span is two lookups, not a pass over everything written."""
    return [F.pad(sigma(k.double()).cumsum(1), (0, 0, 1, 0)) for k in ks]


def event_focus(qs: list[Tensor], sums: list[Tensor], pos: int, start: int, end: int, written: int) -> Tensor:
    """Per layer and head (layers, H), the linear memory's read at position pos on the tokens [start, end), over
    their share of the `written` tokens before it: 1 when the read weighs them as the rest, written / (end - start)
    when it reads them alone. qs: per layer, (H, T, D) queries; sums: `key_sums` of the keys. Equal to summing
    `kernel_weights(q[:, pos], k[:, :written])[:, start:end]`, since every weight shares the denominator."""
    mass = []
    for q, s in zip(qs, sums):
        sq = sigma(q[:, pos].double())  # (H, D)
        group = q.shape[0] // s.shape[0]
        span, total = (s[:, end] - s[:, start]), s[:, written]  # (H_kv, D)
        mass.append((sq * span.repeat_interleave(group, 0)).sum(-1) / (sq * total.repeat_interleave(group, 0)).sum(-1))
    return torch.stack(mass).float() * written / (end - start)


class QKRecorder:
    """The un-rotated queries and keys each layer's memory receives, per streamed segment (forward pre-hooks),
    while `on`."""

    def __init__(self, model):
        self.on = False
        self.q, self.k = [[] for _ in model.layers], [[] for _ in model.layers]
        self.hooks = [layer.attn.memory.register_forward_pre_hook(self._hook(i))
                      for i, layer in enumerate(model.layers)]

    def _hook(self, i):
        def record(module, args):
            if not self.on:
                return
            self.q[i].append(args[0][0].float().cpu())  # (H, L, D) of the batch's one row
            self.k[i].append(args[1][0].float().cpu())
        return record

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, (H, T, D) queries and (H_kv, T, D) keys of the sequence streamed since the last take."""
        out = [torch.cat(x, dim=1) for x in self.q], [torch.cat(x, dim=1) for x in self.k]
        self.q, self.k = [[] for _ in self.q], [[] for _ in self.k]
        return out

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def run_config(run: Path):
    """The config a finished booksum run on synthetic books saved; anything else stops with one line."""
    for name in ("results.json", "model.safetensors"):
        if not (run / name).is_file():
            raise SystemExit(f"error: {run}: no {name} (the probe needs a finished run's config and weights)")
    cfg = OmegaConf.create(json.loads((run / "results.json").read_text())["config"])
    if cfg.task.name != "booksum" or cfg.task.source != "synthetic" or cfg.task.truncate != "head":
        raise SystemExit(f"error: {run}: task.name={cfg.task.name}, task.source={cfg.task.get('source')}, "
                         f"task.truncate={cfg.task.get('truncate')}; the probe needs booksum's synthetic books (their "
                         "events are known), cut at the head")
    return cfg


def load_run(run: Path, device: str = "cpu"):
    """The run's config, its model with the weights it exported (eval mode, on `device`) and its tokenizer."""
    cfg = run_config(run)
    cfg.model.pretrained = None
    cfg.model.init_from = str(run / "model.safetensors")
    model, tokenizer = build_model_and_tokenizer(cfg)
    return cfg, model.to(device).eval(), tokenizer


@torch.no_grad()
def probe(cfg, model, tokenizer) -> tuple[dict, list | None]:
    """Per class: tokens, and the loss and argmax accuracy with the memory carried and wiped, over the
    evaluation books' reference summaries given each whole book (truncated to task.train_input_len); and for the
    linear memory, the read focus on the event per layer and head (else None)."""
    t = cfg.task
    s = t.synthetic
    books = synthetic_books(t.eval_split, t.eval_books, s.book_chars, s.n_events, s.seed)
    tokens = framing_tokens(tokenizer, t.prompt)
    sums = {(c, how): [0, 0.0, 0] for c in CLASSES for how in ("carried", "wiped")}
    n, prefix = model.cfg.segment_len, len(tokens["prefix"])
    recorder = QKRecorder(model) if model.cfg.memory == "linear" else None
    focus, focus_count, ceiling = None, 0, 0.0
    for book in books:
        ids = truncate(tokenizer.encode(book.text), t.train_input_len, t.truncate)
        summary = tokenizer.encode(book.references[0])[: t.summary_max_tokens]
        book_spans = [(a, b) if b <= len(ids) else None for a, b in event_spans(tokenizer, book.text, book.events)]
        summary_spans = event_spans(tokenizer, book.references[0], book.events)
        batch = make_batch([Example(torch.tensor(ids, dtype=torch.long), torch.tensor(summary, dtype=torch.long))],
                           **tokens)
        input_ids, labels = batch["input_ids"].to(model.embed.weight.device), batch["labels"][0]
        scored = (labels != -100).nonzero().flatten()  # positions predicting the summary and EOS
        first = int(scored[0]) + 1
        classes = token_classes(book_spans, summary_spans, first, len(summary), prefix, n)
        for how, carry in (("carried", True), ("wiped", False)):
            if recorder is not None:
                recorder.on = carry  # the read focus is of the memory as carried
            logits = torch.cat(list(streamed_logits(model, input_ids, "auto", carry=carry)), dim=1)[0].cpu()
            if recorder is not None and carry:
                qs, ks = recorder.take()
                running = key_sums(ks)
                for j, c in enumerate(classes):
                    if c != "memory":
                        continue
                    pos = first + j - 1  # the position that predicts summary token j
                    written = pos // n * n  # the tokens of every earlier segment
                    a, b = book_spans[event_of(summary_spans, j)]
                    ratio = event_focus(qs, running, pos, prefix + a, prefix + b, written)
                    focus, focus_count = (ratio if focus is None else focus + ratio), focus_count + 1
                    ceiling += written / (b - a)  # a read on the event's tokens alone
            nll = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")
            hit = logits[scored].argmax(-1) == labels[scored]
            for c, loss, h in zip(classes, nll.tolist(), hit.tolist()):
                row = sums[c, how]
                row[0], row[1], row[2] = row[0] + 1, row[1] + loss, row[2] + int(h)
    if recorder is not None:
        recorder.remove()
    out = {}
    for c in CLASSES:
        count = sums[c, "carried"][0]
        out[c] = {"tokens": count, **{f"{k}_{how}": (sums[c, how][i] / count if count else None)
                                      for how in ("carried", "wiped") for k, i in (("loss", 1), ("acc", 2))}}
    # the read focus per layer and head, the mean over the memory-class tokens, and its ceiling (linear memory only)
    if focus is not None:
        out["memory"]["read_focus_ceiling"] = ceiling / focus_count
    return out, (focus / focus_count).tolist() if focus is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write every run's classes as JSON here (atomically)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models run (default: cuda if there is one; bf16 autocast there)")
    args = parser.parse_args(argv)
    for run in args.runs:  # every folder checked before the first is probed
        run_config(run)
    results = {}
    for run in args.runs:
        cfg, model, tokenizer = load_run(run, args.device)
        classes, focus = probe(cfg, model, tokenizer)
        results[str(run)] = got = {"memory": cfg.memory.name, "segment_len": model.cfg.segment_len,
                                   "classes": classes, "read_focus": focus}
        print(f"{run} ({got['memory']}, N={got['segment_len']})")
        for c, row in classes.items():
            if row["tokens"]:
                print(f"  {c:7s} {row['tokens']:5d} tokens  loss carried {row['loss_carried']:.3f} wiped "
                      f"{row['loss_wiped']:.3f}  acc carried {row['acc_carried']:.3f} wiped {row['acc_wiped']:.3f}")
        if focus is not None:
            print(f"  read focus on the event (1: none, {classes['memory']['read_focus_ceiling']:.1f}: the event "
                  "alone), per layer, heads:", "; ".join(" ".join(f"{x:.2f}" for x in layer) for layer in focus))
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infini_bench.evaluate import streamed_logits  # noqa: E402
from infini_bench.tracking import write_json  # noqa: E402
from tasks.booksum import Example, event_spans, make_batch, synthetic_books, truncate  # noqa: E402
from tasks.runner import build_model_and_tokenizer  # noqa: E402

CLASSES = ("memory", "local", "split", "other")


def token_classes(book_spans: list[tuple[int, int]], summary_spans: list[tuple[int, int]], first_summary: int,
                  n_summary: int, offset: int, segment_len: int) -> list[str]:
    """The class (CLASSES) of each of n_summary + 1 scored tokens (the summary, then EOS).

    book_spans: each event's token span in the book, summary_spans: in the summary (both [start, end), in event
    order); the book's token i is at sequence position offset + i, the summary's token j at first_summary + j and
    is predicted from position first_summary + j - 1. An event truncated out of the book has no span (None)."""
    classes = []
    for j in range(n_summary + 1):
        seg = (first_summary + j - 1) // segment_len  # the segment of the position that predicts token j
        e = next((e for e, (a, b) in enumerate(summary_spans) if a <= j < b), None)
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
def probe(cfg, model, tokenizer) -> dict:
    """Per class: tokens, and the loss and argmax accuracy with the memory carried and wiped, over the
    evaluation books' reference summaries given each whole book (truncated to task.train_input_len)."""
    t = cfg.task
    s = t.synthetic
    books = synthetic_books(t.eval_split, t.eval_books, s.book_chars, s.n_events, s.seed)
    tokens = {"prefix": [tokenizer.bos_id], "prompt": tokenizer.encode(t.prompt), "eos_id": tokenizer.eos_id,
              "pad_id": getattr(tokenizer, "pad_id", tokenizer.eos_id)}
    sums = {(c, how): [0, 0.0, 0] for c in CLASSES for how in ("carried", "wiped")}
    n = model.cfg.segment_len
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
        classes = token_classes(book_spans, summary_spans, first, len(summary), len(tokens["prefix"]), n)
        for how, carry in (("carried", True), ("wiped", False)):
            logits = torch.cat(list(streamed_logits(model, input_ids, "auto", carry=carry)), dim=1)[0].cpu()
            nll = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")
            hit = logits[scored].argmax(-1) == labels[scored]
            for c, loss, h in zip(classes, nll.tolist(), hit.tolist()):
                row = sums[c, how]
                row[0], row[1], row[2] = row[0] + 1, row[1] + loss, row[2] + int(h)
    out = {}
    for c in CLASSES:
        count = sums[c, "carried"][0]
        out[c] = {"tokens": count, **{f"{k}_{how}": (sums[c, how][i] / count if count else None)
                                      for how in ("carried", "wiped") for k, i in (("loss", 1), ("acc", 2))}}
    return out


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
        results[str(run)] = got = {"memory": cfg.memory.name, "segment_len": model.cfg.segment_len,
                                   "classes": probe(cfg, model, tokenizer)}
        print(f"{run} ({got['memory']}, N={got['segment_len']})")
        for c, row in got["classes"].items():
            if row["tokens"]:
                print(f"  {c:7s} {row['tokens']:5d} tokens  loss carried {row['loss_carried']:.3f} wiped "
                      f"{row['loss_wiped']:.3f}  acc carried {row['acc_carried']:.3f} wiped {row['acc_wiped']:.3f}")
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

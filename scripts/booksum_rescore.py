"""Add the event counts of docs/BOOKSUM.md and ROUGE by input length to booksum runs scored before the task
reported them.

    python scripts/booksum_rescore.py RUN_DIR [RUN_DIR ...]

Each run's `booksum_predictions.json` holds every summary it wrote; its `results.json` holds its config. From
them this recomputes, with the task's own functions, `booksum/events_recalled@<len>` (events stated word for
word), `booksum/events_in_input@<len>`, `booksum/guess/overall` and `booksum/rouge1@<len>` (and rouge2, rougeL),
and adds the missing ones to `results.json` (written atomically), with `booksum/rescored_from` naming the
predictions file. Keys a run already has are kept.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infini_bench.metrics import rouge  # noqa: E402
from infini_bench.paper import length_label  # noqa: E402
from infini_bench.tokenizer import ByteTokenizer  # noqa: E402
from infini_bench.tracking import write_json  # noqa: E402
from tasks.booksum import guess, oracle, share_recalled, synthetic_books  # noqa: E402


def rescore(run: Path) -> dict:
    for name in ("results.json", "booksum_predictions.json"):
        if not (run / name).is_file():
            raise SystemExit(f"error: {run}: no {name} (a run that did not finish has nothing to count)")
    saved = json.loads((run / "results.json").read_text())
    cfg, results = saved["config"], saved["results"]
    t, s = cfg["task"], cfg["task"]["synthetic"]
    if t["source"] != "synthetic" or cfg["model"]["tokenizer"] != "byte":
        raise SystemExit(f"error: {run}: only synthetic books read as bytes have events to count")
    preds = json.loads((run / "booksum_predictions.json").read_text())["books"]
    books = synthetic_books(t["eval_split"], len(preds), s["book_chars"], s["n_events"], s["seed"])
    if [b.bid for b in books] != [p["bid"] for p in preds]:
        raise SystemExit(f"error: {run}: its predictions are not of the books its config makes")
    lengths = sorted(t["eval_input_lens"])
    read = oracle(ByteTokenizer(), books, lengths, t["truncate"], cfg["model"]["segment_len"])
    added = {"booksum/guess/overall": guess(books, s["seed"])["overall"],
             "booksum/rescored_from": "booksum_predictions.json"}
    for n in lengths:
        label = length_label(n)
        added[f"booksum/events_in_input@{label}"] = read[n]["events_in_input"]
        written = [p["predictions"][str(n)] for p in preds]
        added[f"booksum/events_recalled@{label}"] = share_recalled(written, books)
        scores = rouge(written, [list(b.references) for b in books])
        added.update({f"booksum/{k}@{label}": scores[k] for k in ("rouge1", "rouge2", "rougeL")})
    new = {k: v for k, v in added.items() if k not in results}
    if len(new) > 1:
        saved["results"] = {**results, **new}
        write_json(run / "results.json", saved)
    return new


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for arg in sys.argv[1:]:
        got = rescore(Path(arg))
        print(arg, {k: round(v, 3) for k, v in got.items() if isinstance(v, float) and "recalled" in k})

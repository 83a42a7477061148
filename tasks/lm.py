"""Long-context language modelling (paper Table 2): train an Infini-Transformer, then measure token
perplexity and bits per byte over whole held-out documents, streamed with the memory carried through."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from infini_bench.data import EMBEDDED, HUB, TokenStream, load_documents
from infini_bench.errors import ConfigError, check_choice, check_positive
from infini_bench.evaluate import evaluate_lm
from infini_bench.plots import line_plot
from infini_bench.tracking import Run
from infini_bench.train import train
from tasks.common import build_model_and_tokenizer, checkpoint_dir, log_gates, train_config

_STAND_IN = {"pg19": "embedded_pg19", "arxiv_math": "embedded_math"}


def _documents(t: DictConfig, split: str):
    """Documents of a split; a hub data set that can't be reached falls back to its embedded stand-in."""
    try:
        return load_documents(t.dataset, split, t.max_train_docs), t.dataset
    except ConfigError as err:
        if t.dataset not in HUB or not t.fallback_offline:
            raise
        tqdm.write(f"warning: {err}; falling back to {_STAND_IN[t.dataset]}")
        return load_documents(_STAND_IN[t.dataset], split), _STAND_IN[t.dataset]


def run_task(cfg: DictConfig, run: Run) -> dict:
    t = cfg.task
    check_choice("task.dataset", t.dataset, EMBEDDED + tuple(HUB))
    check_choice("task.eval_split", t.eval_split, ("validation", "test"))
    check_positive("task.seq_len", t.seq_len)
    check_positive("task.eval_max_docs", t.eval_max_docs)
    model, tokenizer = build_model_and_tokenizer(cfg)
    train_docs, source = _documents(t, "train")
    eval_docs = _documents(t, t.eval_split)[0][: t.eval_max_docs]
    overrides = {}
    if t.train_segments is not None:  # training length counted in segments
        check_positive("task.train_segments", t.train_segments)
        per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum * max(1, t.seq_len // model.cfg.segment_len)
        overrides["steps"] = -(-t.train_segments // per_step)
    tcfg = train_config(cfg, **overrides)
    stream = TokenStream(train_docs, tokenizer, t.seq_len, tcfg.batch_size, tcfg.seed)

    def evaluate(m, step):
        r = evaluate_lm(m, eval_docs, tokenizer, run.device, t.eval_max_tokens, tcfg.precision)
        log_gates(m, run, step)
        return {"val/loss": r["loss"], "val/ppl": r["ppl"], "val/bpb": r["bpb"]}

    summary = train(model, tcfg, stream, run, checkpoint_dir(run), eval_fn=evaluate)
    final = evaluate_lm(model, eval_docs, tokenizer, run.device, t.eval_max_tokens, tcfg.precision)
    split = "val" if t.eval_split == "validation" else "test"
    results = {f"{split}/ppl": final["ppl"], f"{split}/bpb": final["bpb"], f"{split}/loss": final["loss"],
               f"{split}/tokens": final["tokens"], "train/loss": summary.get("train/loss"),
               "train/steps": tcfg.steps, "data/source": source,
               "model/params": sum(p.numel() for p in model.parameters()),
               "model/memory_floats": model.cfg.memory_floats,  # paper Table 1: d_key (d_value + 1) H l
               f"{split}/loss_by_segment": final["loss_by_segment"]}
    run.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=tcfg.steps)
    # Does the loss fall later in a book, as the memory fills? A table W&B can plot, and a PNG.
    run.log_table(f"{split}/loss_by_segment", ["segment", "loss"],
                  [[k, v] for k, v in enumerate(final["loss_by_segment"])], step=tcfg.steps)
    curve = line_plot({cfg.memory.rule: final["loss_by_segment"]}, Path(run.out_dir) / "loss_by_segment.png",
                      "segment index in document", "mean token loss (nats)", "Loss by segment position")
    run.log_image(f"{split}/loss_by_segment", curve, step=tcfg.steps)
    log_gates(model, run, tcfg.steps)
    return results

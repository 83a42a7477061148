"""Long-context language modelling (paper Table 2): train an Infini-Transformer, then measure token
perplexity and bits per byte over whole held-out documents, streamed with the memory carried through."""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig

from infini_bench.code_corpus import code_manifest
from infini_bench.data import CODE, EMBEDDED, HUB, MixtureStream, TokenStream, load_documents
from infini_bench.distributed import is_main_process, main_first
from infini_bench.errors import ConfigError, ResourceError, check_choice, check_positive
from infini_bench.evaluate import evaluate_lm
from infini_bench.faults import fault
from infini_bench.plots import line_plot
from infini_bench.tracking import Run
from infini_bench.train import train
from tasks.common import (build_model_and_tokenizer, checkpoint_dir, export_weights, footprint_results, log_gates,
                          eval_count, log_setting, no_batches, train_config)

log = logging.getLogger(__name__)
_STAND_IN = {"pg19": "embedded_pg19", "arxiv_math": "embedded_math", "c4": None}  # no web text is embedded


def _code_options(t: DictConfig) -> dict:
    """How task.dataset=python_code is built: which folders, how many bytes, which fraction is held out."""
    roots = t.get("code_roots")
    if roots is not None and (isinstance(roots, str) or not all(isinstance(r, str) for r in roots)):
        raise ConfigError("task.code_roots", f"{roots!r} must be null or a list of folders")
    return {"roots": None if roots is None else tuple(roots), "max_bytes": t.get("max_bytes"),
            "held_out": t.get("held_out", 0.05)}


def _documents(t: DictConfig, dataset: str, split: str, min_bytes: int = 0, unreachable: set[str] | None = None):
    """Documents of a split and the data set they came from; a hub data set that can't be reached falls back
    to its embedded stand-in (None when it has none: C4). `unreachable` gathers, over one run, the hub data
    sets that fell back: their other splits go straight to the stand-in, and the warning is given once."""
    # python_code: training needs one window of seq_len + 1 tokens, at least as many bytes
    code = {**_code_options(t), "min_bytes": t.seq_len + 2 if split == "train" else 2} if dataset in CODE else None
    stand_in = _STAND_IN.get(dataset)
    if unreachable is None or dataset not in unreachable:
        try:
            return load_documents(dataset, split, t.max_train_docs, min_bytes, code), dataset
        except ConfigError as err:
            if dataset not in HUB or not t.fallback_offline:
                raise
            if is_main_process():  # once, not once per rank; recorded in results.json as data/fallback too
                log.warning("%s; %s", err, f"falling back to {stand_in}" if stand_in else "leaving it out")
            if unreachable is not None:
                unreachable.add(dataset)
    return (load_documents(stand_in, split) if stand_in else ()), stand_in


def _mixture(t: DictConfig) -> dict[str, float]:
    """task.mix as {data set: weight}, checked; {task.dataset: 1} when there is no mix."""
    if t.get("mix") is None:
        return {t.dataset: 1.0}
    if not isinstance(t.mix, DictConfig) or not len(t.mix):
        raise ConfigError("task.mix", f"{t.mix!r} must map data sets to weights, e.g. {{pg19: 1, c4: 1}}")
    for name, weight in t.mix.items():
        check_choice("task.mix", name, EMBEDDED + CODE + tuple(HUB))
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ConfigError(f"task.mix.{name}", f"{weight!r} must be a number > 0")
    return {str(k): float(v) for k, v in t.mix.items()}


def training_stream(t: DictConfig, mix: dict[str, float], min_tokens: int, tokenizer, batch_size: int, seed: int,
                    unreachable: set[str] | None = None):
    """Training batches from the data sets in `mix` (by weight), and where each of them came from."""
    streams, weights, sources = {}, {}, {}
    for name, weight in mix.items():
        docs, source = _documents(t, name, "train", min_tokens, unreachable)
        sources[name] = source
        if source is None:
            continue
        if source in streams:  # two hub data sets fell back to one stand-in: it keeps both weights
            weights[source] += weight
            continue
        streams[source] = TokenStream(docs, tokenizer, t.seq_len, batch_size, seed, min_tokens)
        weights[source] = weight
    if not streams:
        key = "task.mix" if t.get("mix") is not None else "task.dataset"
        raise ConfigError(key, f"none of {', '.join(mix)} could be reached, and C4 has no embedded stand-in")
    if len(streams) == 1 and t.get("mix") is None:
        return next(iter(streams.values())), sources
    return MixtureStream(streams, weights, batch_size, seed), sources


def prepared_stream(t: DictConfig, mix: dict[str, float], min_tokens: int, tokenizer, batch_size: int, seed: int,
                    cache: Path, fresh: bool, unreachable: set[str] | None = None):
    """The training stream, tokenized once per run. Rank 0 streams and tokenizes the documents and saves the
    tokens to `cache`; the other ranks read that file, and so does a resumed run, which then trains on exactly
    the same tokens even if the hub's copy has changed meanwhile. `fresh` (trainer.resume=false) rebuilds it."""
    key = json.dumps({"mix": mix, "min_tokens": min_tokens, "seq_len": t.seq_len, "max_docs": t.max_train_docs,
                      "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
                      "vocab": tokenizer.vocab_size}, sort_keys=True)

    def load() -> dict:
        try:
            return torch.load(cache, weights_only=True, mmap=True)  # mmap: the ranks share one copy in RAM
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise ConfigError("trainer.resume", f"{cache} is corrupt ({str(err).splitlines()[0][:80]}); "
                              "trainer.resume=false rebuilds it") from None

    def stored() -> dict | None:
        if fresh or not cache.exists():
            return None
        state = load()
        return state if state["key"] == key else None

    def build() -> tuple[object, dict] | None:
        if stored() is not None:
            return None
        stream, sources = training_stream(t, mix, min_tokens, tokenizer, batch_size, seed, unreachable)
        parts = stream.streams if isinstance(stream, MixtureStream) else {next(iter(mix)): stream}
        weights = stream.weights if isinstance(stream, MixtureStream) else None
        state = {"key": key, "sources": sources, "weights": weights,
                 "streams": {name: s.state() for name, s in parts.items()}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as err:  # a full disk: torch's writer raises RuntimeError
            tmp.unlink(missing_ok=True)
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise ResourceError(f"{cache} could not be written ({first}); free disk space there or pick "
                                "another hydra.run.dir") from None
        os.replace(tmp, cache)
        return stream, sources

    built = main_first(build)  # rank 0 builds (unless a run before it did); every rank waits for the file
    if built is not None:
        return built
    state = load()  # rank 0 has written it, or found it current
    streams = {name: TokenStream.from_state(s, t.seq_len, batch_size, seed) for name, s in state["streams"].items()}
    if state["weights"] is None:
        return next(iter(streams.values())), state["sources"]
    return MixtureStream(streams, state["weights"], batch_size, seed), state["sources"]


def check_values(cfg: DictConfig) -> None:
    """The task values that need no data to judge."""
    check_choice("task.dataset", cfg.task.dataset, EMBEDDED + CODE + tuple(HUB))
    check_choice("task.eval_split", cfg.task.eval_split, ("validation", "test"))


def run_task(cfg: DictConfig, run: Run) -> dict:
    t = cfg.task
    check_values(cfg)
    check_positive("task.seq_len", t.seq_len)
    check_positive("task.eval_max_docs", t.eval_max_docs)
    mix, min_tokens = _mixture(t), t.get("min_doc_tokens", 0)
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise ConfigError("task.min_doc_tokens", f"{min_tokens!r} must be an integer >= 0")
    log_setting(cfg)
    # The data before the model: without the hub, a paper recipe stops here with one line naming
    # task.fallback_offline, before a tokenizer or checkpoint is looked for.
    unreachable: set[str] = set()
    eval_docs, eval_source = _documents(t, t.dataset, t.eval_split, unreachable=unreachable)
    eval_docs = eval_docs[: eval_count(t)]
    if not eval_docs:
        raise ConfigError("task.dataset", f"{t.dataset!r} could not be reached for evaluation and has no "
                          "embedded stand-in; pick embedded_pg19, embedded_math, pg19 or arxiv_math")
    model, tokenizer = build_model_and_tokenizer(cfg)
    overrides = {}
    if t.train_segments is not None:  # training length counted in segments
        check_positive("task.train_segments", t.train_segments)
        per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum * max(1, t.seq_len // model.cfg.segment_len)
        overrides["steps"] = -(-t.train_segments // per_step)
    tcfg = train_config(cfg, **overrides)
    if tcfg.steps:
        stream, sources = prepared_stream(t, mix, min_tokens, tokenizer, tcfg.batch_size, tcfg.seed,
                                          Path(run.out_dir) / "train_tokens.pt", fresh=not tcfg.resume,
                                          unreachable=unreachable)
    else:  # evaluation only: no training data is read, and the data used is the evaluation's
        stream, sources = no_batches, {t.dataset: eval_source}

    def evaluate(m, step):
        r = evaluate_lm(m, eval_docs, tokenizer, run.device, t.eval_max_tokens, tcfg.precision, tcfg.progress)
        log_gates(m, run, step)
        return {"val/loss": r["loss"], "val/ppl": r["ppl"], "val/bpb": r["bpb"]}

    summary = train(model, tcfg, stream, run, checkpoint_dir(run), eval_fn=evaluate)
    if tcfg.steps:
        export_weights(model, run)  # for model.init_from: e.g. continual pre-training, then passkey fine-tuning
    fault("final_evaluation")
    final = evaluate_lm(model, eval_docs, tokenizer, run.device, t.eval_max_tokens, tcfg.precision, tcfg.progress)
    split = "val" if t.eval_split == "validation" else "test"
    results = {f"{split}/ppl": final["ppl"], f"{split}/bpb": final["bpb"], f"{split}/loss": final["loss"],
               f"{split}/tokens": final["tokens"], f"{split}/docs": len(eval_docs),
               "train/loss": summary.get("train/loss"),
               "train/steps": summary.get("train/steps", tcfg.steps), "train/seconds": summary.get("train/seconds"),
               "data/source": ", ".join(f"{k}={v}" for k, v in sources.items()),
               "data/eval_source": eval_source,
               "data/fallback": ", ".join(f"{k}={v}" for k, v in {**sources, t.dataset: eval_source}.items()
                                          if k != v) or None,
               "model/params": sum(p.numel() for p in model.parameters()),
               **footprint_results(model.cfg, t.seq_len),  # paper Table 1
               f"{split}/loss_by_segment": final["loss_by_segment"]}
    if set(CODE) & {t.dataset, *mix}:  # environments differ: say exactly which source code was read
        results["data/manifest"] = code_manifest(**_code_options(t))
    run.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=tcfg.steps)
    # Does the loss fall later in a book, as the memory fills? A table W&B can plot, and a PNG.
    run.log_table(f"{split}/loss_by_segment", ["segment", "loss"],
                  [[k, v] for k, v in enumerate(final["loss_by_segment"])], step=tcfg.steps)
    curve = line_plot({cfg.memory.name: final["loss_by_segment"]}, Path(run.out_dir) / "loss_by_segment.png",
                      "segment index in document", "mean token loss (nats)", "Loss by segment position",
                      memories={cfg.memory.name: cfg.memory.name})
    run.log_image(f"{split}/loss_by_segment_plot", curve, step=tcfg.steps)  # the table keeps its own key
    log_gates(model, run, tcfg.steps)
    return results

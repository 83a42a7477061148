"""Long-context language modelling (paper Table 2): train an Infini-Transformer, then measure token
perplexity and bits per byte over whole held-out documents, streamed with the memory carried through."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from infini_bench.code_corpus import TRAIN_DOCUMENTS, code_manifest
from infini_bench.data import CODE, EMBEDDED, HUB, MixtureStream, TokenStream, load_documents
from infini_bench.distributed import is_main_process, main_first
from infini_bench.documents import Document, documents_digest
from infini_bench.errors import ConfigError, check_choice, check_positive
from infini_bench.evaluate import evaluate_lm
from infini_bench.plots import line_plot
from infini_bench.token_cache import Entry, TokenCache, state_digest
from infini_bench.tokenizer import Tokenizer
from infini_bench.tracking import write_json
from infini_bench.train import TrainConfig
from tasks.common import footprint_results, no_batches
from tasks.runner import Task, eval_count, train_config

log = logging.getLogger(__name__)
_STAND_IN = {"pg19": "embedded_pg19", "arxiv_math": "embedded_math", "c4": None}  # no web text is embedded


def _code_options(t: DictConfig) -> dict:
    """How task.dataset=python_code is built: which folders, how many bytes, which fraction is held out."""
    roots = t.get("code_roots")
    if roots is not None and (isinstance(roots, str) or not all(isinstance(r, str) for r in roots)):
        raise ConfigError("task.code_roots", f"{roots!r} must be null or a list of folders")
    return {"roots": None if roots is None else tuple(roots), "max_bytes": t.get("max_bytes"),
            "held_out": t.get("held_out", 0.05)}


def _train_documents(t: DictConfig) -> dict:
    """What a training document of python_code is (a package or a file); the held-out splits are packages."""
    return {"train_documents": t.get("train_documents", "package")}


def _load(t: DictConfig, dataset: str, split: str, min_bytes: int = 0):
    """Documents of a split of one data set, as task.* says to read them."""
    # python_code: training needs one window of seq_len + 1 tokens, at least as many bytes
    code = {**_code_options(t), **_train_documents(t), "min_bytes": t.seq_len + 2 if split == "train" else 2} \
        if dataset in CODE else None
    return load_documents(dataset, split, t.max_train_docs, min_bytes, code)


def _documents(t: DictConfig, dataset: str, split: str, min_bytes: int = 0, unreachable: set[str] | None = None):
    """Documents of a split and the data set they came from; a hub data set that can't be reached falls back
    to its embedded stand-in (None when it has none: C4). `unreachable` gathers, over one run, the hub data
    sets that fell back: their other splits go straight to the stand-in, and the warning is given once."""
    stand_in = _STAND_IN.get(dataset)
    if unreachable is None or dataset not in unreachable:
        try:
            return _load(t, dataset, split, min_bytes), dataset
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


def tokens_key(t: DictConfig, dataset: str, min_tokens: int, tokenizer: Tokenizer,
               docs: Sequence[Document] | None = None) -> dict:
    """What decides a data set's training tokens, the key of its entry in the token cache: the documents (a
    SHA-256 of their text; for a hub data set, which ones its stream yields, as they can't be hashed before
    they are streamed), the tokenizer (its definition's SHA-256), and which documents are kept whole."""
    within = min_tokens > 0
    key = {"dataset": dataset, "split": "train", "tokenizer": tokenizer.name,
           "tokenizer_sha256": tokenizer.fingerprint(), "within_docs": within,
           "shortest": max(min_tokens, t.seq_len + 1) if within else 0}
    if dataset in HUB:
        return {**key, "hub": HUB[dataset], "max_docs": t.max_train_docs, "min_bytes": min_tokens}
    return {**key, "documents_sha256": documents_digest(docs)}


def _tokenize(t: DictConfig, docs, tokenizer, min_tokens: int) -> dict:
    return TokenStream(docs, tokenizer, t.seq_len, 1, 0, min_tokens).state()  # batch size, seed: not in the state


def _said(entry: Entry, dataset: str, how: str) -> Entry:
    log.info("training tokens of %s: %s the token cache, %s", dataset, how, entry.path)
    return entry


def _cached(cache: TokenCache, key: dict, tokenize: Callable[[], dict]) -> Entry:
    """The entry under `key`: an earlier run's, or tokenized now and stored."""
    found = cache.load(key)
    if found is not None:
        return _said(found, key["dataset"], "read from")
    return _said(cache.save(key, tokenize()), key["dataset"], "tokenized into")


def _train_source(t: DictConfig, name: str, min_tokens: int, tokenizer, cache: TokenCache,
                  unreachable: set[str] | None) -> tuple[str | None, dict | None, Entry | None]:
    """The data set `name` of the mix trains on (itself, or its stand-in when the hub can't be reached), the key
    of its tokens in the cache and the entry; a hub data set an earlier run streamed is not streamed again."""
    if name in HUB and name not in (unreachable or ()):
        key = tokens_key(t, name, min_tokens, tokenizer)
        found = cache.load(key)
        if found is not None:
            return name, key, _said(found, name, "read from")
    docs, source = _documents(t, name, "train", min_tokens, unreachable)
    if source is None:
        return None, None, None
    key = tokens_key(t, source, min_tokens, tokenizer, docs)
    return source, key, _cached(cache, key, lambda: _tokenize(t, docs, tokenizer, min_tokens))


def _new_plan(t: DictConfig, mix: dict[str, float], min_tokens: int, tokenizer, cache: TokenCache,
              unreachable: set[str] | None) -> tuple[dict, dict]:
    """Which data set each of the mix trains on, their weights and cache entries (key and SHA-256), and the
    tokens themselves."""
    sources, weights, pins, states = {}, {}, {}, {}
    for name, weight in mix.items():
        source, key, found = _train_source(t, name, min_tokens, tokenizer, cache, unreachable)
        sources[name] = source
        if source is None:
            continue
        if source in pins:  # two hub data sets fell back to one stand-in: it keeps both weights
            weights[source] += weight
            continue
        pins[source], states[source] = {"key": key, "sha256": found.sha256, "file": str(found.path)}, found.state
        weights[source] = weight
    if not pins:
        key = "task.mix" if t.get("mix") is not None else "task.dataset"
        raise ConfigError(key, f"none of {', '.join(mix)} could be reached, and C4 has no embedded stand-in")
    single = len(pins) == 1 and t.get("mix") is None
    return {"sources": sources, "weights": None if single else weights, "streams": pins}, states


def _pinned(t: DictConfig, source: str, pin: dict, min_tokens: int, tokenizer, cache: TokenCache, record: Path
            ) -> dict:
    """The tokens a run started with, from the cache; when they are no longer there (cleared, corrupt, another
    cache_dir) tokenized again from the same documents, and used only if they come out the same."""
    found = cache.load(pin["key"], sha256=pin["sha256"])
    if found is not None:
        return found.state
    start_over = f"(recorded in {record}); trainer.resume=false starts over"
    try:
        state = _tokenize(t, _load(t, source, "train", min_tokens), tokenizer, min_tokens)
    except ConfigError as err:
        raise ConfigError("trainer.resume", f"the training tokens of {source} are not in the token cache and can't "
                          f"be made again ({err}) {start_over}") from None
    if state_digest(state) != pin["sha256"]:
        raise ConfigError("trainer.resume", f"the training tokens of {source} are not in the token cache, and "
                          f"tokenized again they differ from those this run started with {start_over}")
    return cache.save(pin["key"], state).state


def _read_plan(record: Path, recipe: dict) -> dict | None:
    """The training data a run in this folder started with; None when there is none, or it was another recipe's."""
    if not record.exists():
        return None
    try:
        plan = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("trainer.resume", f"{record} is corrupt ({str(err).splitlines()[0][:80]}); "
                          "trainer.resume=false starts over") from None
    return plan if plan.get("recipe") == recipe else None


def prepared_stream(t: DictConfig, mix: dict[str, float], min_tokens: int, tokenizer, batch_size: int, seed: int,
                    cache: TokenCache, record: Path, fresh: bool, unreachable: set[str] | None = None):
    """The training stream, and where each data set of the mix came from.

    Each data set's tokens come from the shared token cache, tokenized by the first run that needed them. Rank 0
    builds what is missing and writes `record` (train_tokens.json in the run folder): the data sets trained on
    and the key and SHA-256 of their entries. The other ranks read the entries it names, and so does a resumed
    run, which then trains on exactly the same tokens even if the hub's copy has changed meanwhile, or stops
    with one line when they can't be had again. `fresh` (trainer.resume=false) makes a new record; the cache
    entries it finds are reused."""
    recipe = json.loads(json.dumps({
        "mix": mix, "min_tokens": min_tokens, "seq_len": t.seq_len, "max_docs": t.max_train_docs,
        "code": _code_options(t), "tokenizer": tokenizer.name, "vocab": tokenizer.vocab_size}))  # as JSON reads back

    def build() -> tuple[dict, dict]:
        plan = None if fresh else _read_plan(record, recipe)
        if plan is None:
            plan, states = _new_plan(t, mix, min_tokens, tokenizer, cache, unreachable)
            plan = {"recipe": recipe, **plan}
            write_json(record, plan)
            return plan, states
        return plan, {source: _pinned(t, source, pin, min_tokens, tokenizer, cache, record)
                      for source, pin in plan["streams"].items()}

    built = main_first(build)  # rank 0 builds what is missing; every rank waits for the record
    if built is not None:
        plan, states = built
    else:
        plan, states = _read_plan(record, recipe), {}
        for source, pin in plan["streams"].items():
            found = cache.load(pin["key"], sha256=pin["sha256"])
            if found is None:
                raise ConfigError("trainer.resume", f"the training tokens of {source} in the token cache changed "
                                  "while the run started; run the command again")
            states[source] = found.state
    start = t.get("window_start", "any")
    streams = {source: TokenStream.from_state(state, t.seq_len, batch_size, seed, start)
               for source, state in states.items()}
    if plan["weights"] is None:
        return next(iter(streams.values())), plan["sources"]
    return MixtureStream(streams, plan["weights"], batch_size, seed), plan["sources"]


class LanguageModelling(Task):
    """Train on a token stream (or a mix of them), evaluate perplexity and bits per byte on whole documents."""

    @staticmethod
    def check_values(cfg: DictConfig) -> None:
        check_choice("task.dataset", cfg.task.dataset, EMBEDDED + CODE + tuple(HUB))
        check_choice("task.eval_split", cfg.task.eval_split, ("validation", "test"))
        check_choice("task.train_documents", cfg.task.get("train_documents", "package"), TRAIN_DOCUMENTS)

    def check(self) -> None:
        t = self.t
        self.check_values(self.cfg)
        check_positive("task.seq_len", t.seq_len)
        check_positive("task.eval_max_docs", t.eval_max_docs)
        self.mix, self.min_tokens = _mixture(t), t.get("min_doc_tokens", 0)
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ConfigError("task.min_doc_tokens", f"{self.min_tokens!r} must be an integer >= 0")

    def load(self) -> None:
        t = self.t
        self.unreachable: set[str] = set()
        eval_docs, self.eval_source = _documents(t, t.dataset, t.eval_split, unreachable=self.unreachable)
        self.eval_docs = eval_docs[: eval_count(t)]
        if not self.eval_docs:
            raise ConfigError("task.dataset", f"{t.dataset!r} could not be reached for evaluation and has no "
                              "embedded stand-in; pick embedded_pg19, embedded_math, pg19 or arxiv_math")

    def setup(self) -> TrainConfig:
        t, cfg = self.t, self.cfg
        overrides = {}
        if t.train_segments is not None:  # training length counted in segments
            check_positive("task.train_segments", t.train_segments)
            per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum * max(1, t.seq_len // self.model.cfg.segment_len)
            overrides["steps"] = -(-t.train_segments // per_step)
        tcfg = train_config(cfg, **overrides)
        if tcfg.steps:
            self.stream, self.sources = prepared_stream(
                t, self.mix, self.min_tokens, self.tokenizer, tcfg.batch_size, tcfg.seed,
                TokenCache(Path(cfg.cache_dir) / "tokens"), Path(self.run.out_dir) / "train_tokens.json",
                fresh=not tcfg.resume, unreachable=self.unreachable)
        else:  # evaluation only: no training data is read, and the data used is the evaluation's
            self.stream, self.sources = no_batches, {t.dataset: self.eval_source}
        return tcfg

    def batches(self) -> Callable[[int], dict]:
        return self.stream

    def _evaluate_lm(self, model) -> dict:
        return evaluate_lm(model, self.eval_docs, self.tokenizer, self.run.device, self.t.eval_max_tokens,
                           self.tcfg.precision, self.tcfg.progress)

    def validate(self, model) -> dict[str, float]:
        r = self._evaluate_lm(model)
        return {"val/loss": r["loss"], "val/ppl": r["ppl"], "val/bpb": r["bpb"]}

    def evaluate(self, model, summary: dict) -> dict:
        t, sources = self.t, self.sources
        final = self._evaluate_lm(model)
        self.split = split = "val" if t.eval_split == "validation" else "test"
        results = {f"{split}/ppl": final["ppl"], f"{split}/bpb": final["bpb"], f"{split}/loss": final["loss"],
                   f"{split}/tokens": final["tokens"], f"{split}/docs": len(self.eval_docs),
                   "train/loss": summary.get("train/loss"),
                   "train/steps": self.final_step,
                   "train/seconds": summary.get("train/seconds"),
                   "data/source": ", ".join(f"{k}={v}" for k, v in sources.items()),
                   "data/eval_source": self.eval_source,
                   "data/fallback": ", ".join(f"{k}={v}" for k, v in {**sources, t.dataset: self.eval_source}.items()
                                              if k != v) or None,
                   "model/params": sum(p.numel() for p in model.parameters()),
                   **footprint_results(model.cfg, t.seq_len),  # paper Table 1
                   f"{split}/loss_by_segment": final["loss_by_segment"]}
        if set(CODE) & {t.dataset, *self.mix}:  # environments differ: say exactly which source code was read
            results["data/manifest"] = code_manifest(**_code_options(t))
        return results

    def artefacts(self, results: dict) -> None:
        """Does the loss fall later in a book, as the memory fills? A table W&B can plot, and a PNG."""
        run, split, step, memory = self.run, self.split, self.final_step, self.cfg.memory.name
        by_segment = results[f"{split}/loss_by_segment"]
        run.log_table(f"{split}/loss_by_segment", ["segment", "loss"], [[k, v] for k, v in enumerate(by_segment)],
                      step=step)
        curve = line_plot({memory: by_segment}, Path(run.out_dir) / "loss_by_segment.png",
                          "segment index in document", "mean token loss (nats)", "Loss by segment position",
                          memories={memory: memory})
        run.log_image(f"{split}/loss_by_segment_plot", curve, step=step)  # the table keeps its own key


TASK = LanguageModelling

"""Evaluation metrics. Every metric here is higher-is-better."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from infini_bench.errors import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def rouge_scorer():
    """The ROUGE scorer; called when a task that scores with it starts, so that a missing package stops the run
    before training rather than after it."""
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        raise ConfigError("task", "booksum scores summaries with ROUGE, and the rouge-score package is missing "
                                  "(pip install rouge-score)") from None
    return RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure x 100 averaged over predictions, and overall = their geometric mean.

    Each prediction may have several references; per ROUGE type the best-scoring reference counts, as in
    SCROLLS and Unlimiformer (rouge-score's `score_multi`). Tokens are lower-cased and Porter-stemmed.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"prediction {pred[:40]!r} has no reference")
        scores = scorer.score_multi(refs, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    out = {key: 100.0 * total / len(predictions) for key, total in totals.items()}
    out["overall"] = overall(*(out[key] for key in ROUGE_TYPES))
    return out


def overall(*scores: float) -> float:
    """The geometric mean of ROUGE-1, -2 and -L: the paper's (and SCROLLS') single "overall" number."""
    return math.prod(scores) ** (1.0 / len(scores))

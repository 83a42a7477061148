"""ROUGE on pairs scored by hand and against a naive count, max over references, and the overall geometric mean."""
import random
from collections import Counter

import pytest

from infini_bench.metrics import overall, rouge
from infini_bench.paper import TABLE4


def test_known_pair():
    # unigrams: 5 of 6 match (the extra 'the' is clipped); bigrams: the-cat, cat-sat, sat-on of 5; LCS: 5 of 6
    out = rouge(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert out["rouge1"] == pytest.approx(500 / 6)
    assert out["rouge2"] == pytest.approx(60.0)
    assert out["rougeL"] == pytest.approx(500 / 6)
    assert out["overall"] == pytest.approx(overall(500 / 6, 60.0, 500 / 6))


def test_unequal_lengths_and_stemming():
    # pred 3 tokens, ref 6 tokens; 'jumped'/'jumps' both stem to 'jump'. P = 3/3, R = 3/6 -> F = 2/3.
    out = rouge(["Fox jumped high!"], ["the quick fox jumps very high"])
    assert out["rouge1"] == pytest.approx(200 / 3)
    # bigrams: fox-jump matches, jump-high does not (ref has jump-very): P = 1/2, R = 1/5 -> F = 2/7
    assert out["rouge2"] == pytest.approx(200 / 7)
    assert out["rougeL"] == pytest.approx(200 / 3)  # LCS fox jump high = 3


def test_identical_and_disjoint():
    out = rouge(["alpha beta gamma", "alpha beta gamma"], ["alpha beta gamma", "delta epsilon zeta"])
    for key in ("rouge1", "rouge2", "rougeL", "overall"):
        assert out[key] == pytest.approx(50.0)  # mean of 100 and 0
    assert rouge(["x y"], ["z w"])["overall"] == 0.0


def test_max_over_references_per_type():
    pred = "the cat sat on the mat"
    single = rouge([pred], ["the cat sat on a mat"])
    multi = rouge([pred], [["something else entirely", "the cat sat on a mat", "mat"]])
    for key in single:
        assert multi[key] == pytest.approx(single[key])
    # Max is taken per ROUGE type: 'd c b a' wins ROUGE-1, 'a b x y z w' wins ROUGE-2 and ROUGE-L.
    out = rouge(["a b c d"], [["d c b a", "a b x y z w"]])
    assert out["rouge1"] == pytest.approx(100.0)
    assert out["rouge2"] == pytest.approx(25.0)  # a-b: P = 1/3, R = 1/5
    assert out["rougeL"] == pytest.approx(40.0)  # LCS a b: P = 2/4, R = 2/6


def test_overall_reproduces_every_row_of_the_papers_table4():
    for name, (r1, r2, rl, paper_overall) in TABLE4.items():
        assert overall(r1, r2, rl) == pytest.approx(paper_overall, abs=0.05), name  # the paper rounds to 0.1


def _naive(pred: list[str], ref: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F x 100 straight from the definitions: clipped n-gram overlap, and an LCS table."""
    def f(match: int, n_pred: int, n_ref: int) -> float:
        return 0.0 if match == 0 else 100 * 2 * match / (n_pred + n_ref)

    def grams(tokens, n):
        return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))

    out = {}
    for n in (1, 2):
        p, r = grams(pred, n), grams(ref, n)
        out[f"rouge{n}"] = f(sum((p & r).values()), sum(p.values()), sum(r.values()))
    lcs = [[0] * (len(ref) + 1) for _ in range(len(pred) + 1)]
    for i, a in enumerate(pred):
        for j, b in enumerate(ref):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    out["rougeL"] = f(lcs[-1][-1], len(pred), len(ref))
    return out


def test_rouge_equals_a_naive_count_on_random_pairs():
    words = ["cat", "dog", "red", "big", "sun", "sky"]  # the stemmer leaves these as they are
    rng = random.Random(0)
    for _ in range(40):
        pred = [rng.choice(words) for _ in range(rng.randint(1, 9))]
        ref = [rng.choice(words) for _ in range(rng.randint(1, 9))]
        ours, naive = rouge([" ".join(pred)], [" ".join(ref)]), _naive(pred, ref)
        for key in naive:
            assert ours[key] == pytest.approx(naive[key]), (pred, ref, key)
        assert ours["overall"] == pytest.approx(overall(*(naive[k] for k in ("rouge1", "rouge2", "rougeL"))))


def test_bad_input():
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        rouge(["a"], [[]])

"""ROUGE on pairs scored by hand, max over references, and the overall geometric mean."""
import math

import pytest

from infini_bench.metrics import rouge


def test_known_pair():
    # unigrams: 5 of 6 match (the extra 'the' is clipped); bigrams: the-cat, cat-sat, sat-on of 5; LCS: 5 of 6
    out = rouge(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert out["rouge1"] == pytest.approx(500 / 6)
    assert out["rouge2"] == pytest.approx(60.0)
    assert out["rougeL"] == pytest.approx(500 / 6)
    assert out["overall"] == pytest.approx((500 / 6 * 60.0 * 500 / 6) ** (1 / 3))


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


def test_overall_matches_paper_table4_rows():
    # The paper's 'overall' is the geometric mean of, R-L: check the formula on its BART row.
    assert math.prod([36.4, 7.6, 15.3]) ** (1 / 3) == pytest.approx(16.2, abs=0.05)


def test_bad_input():
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        rouge(["a"], [[]])

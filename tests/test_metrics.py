"""Metrics against hand-worked examples."""

import statistics

import pytest

from eval_scripts import metrics as M


def test_normalize_answer():
    assert M.normalize_answer("The Quick, brown fox!") == "quick brown fox"
    assert M.normalize_answer("  An apple a day\tkeeps   THE doctor away. ") == "apple day keeps doctor away"
    assert M.normalize_answer("theater") == "theater"  # articles only as whole words
    assert M.normalize_answer("The.") == ""


def test_exact_match():
    assert M.exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 1.0
    assert M.exact_match("Eiffel", ["Eiffel tower", "Paris"]) == 0.0
    assert M.exact_match("Paris", "paris") == 1.0


def test_f1_hand_worked():
    # pred {cat, sat} vs gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert M.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    # maximum over several golds
    assert M.f1("blue sky", ["red", "blue sky today"]) == pytest.approx(0.8)
    # token multiplicity: pred [cat] vs gold [cat, cat]: P = 1, R = 1/2, F1 = 2/3
    assert M.f1("the the cat", "cat cat") == pytest.approx(2 / 3)
    assert M.f1("dog", ["cat"]) == 0.0


def test_unanswerable_as_the_official_script():
    # no gold survives normalisation -> the single gold "" : only an empty prediction scores
    assert M.exact_match("", []) == 1.0 and M.f1("", []) == 1.0
    assert M.exact_match("The.", []) == 1.0
    assert M.exact_match("Paris", []) == 0.0 and M.f1("Paris", []) == 0.0
    # golds that normalise to "" are dropped when a real one remains
    assert M.exact_match("", ["a", "Paris"]) == 0.0
    assert M.f1("", ["Paris"]) == 0.0


def test_quac_references():
    C = M.QUAC_CANNOTANSWER
    assert M.quac_references([C, C, "x"]) == [C]
    assert M.quac_references([C, "x"]) == [C]  # a tie goes to CANNOTANSWER
    assert M.quac_references([C, "x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError):
        M.quac_references([])


def test_quac_f1_leave_one_out():
    refs = ["red car", "red car door", "blue"]
    # F1 of "red car" against each: 1, 0.8, 0; leaving out each: max(0.8, 0), max(1, 0), max(1, 0.8)
    assert M.quac_f1("red car", refs) == pytest.approx((0.8 + 1 + 1) / 3)
    assert M.quac_f1("red car", ["red car door"]) == pytest.approx(0.8)  # a single reference: plain F1
    C = M.QUAC_CANNOTANSWER
    assert M.quac_f1(C, [C, C, C]) == 1.0
    assert M.quac_f1("cannotanswer", [C, C]) == 0.0  # only the exact string matches
    # human agreement: best F1 of each reference against the others: 0.8, 0.8, 0
    assert M.quac_human_f1(refs) == pytest.approx(1.6 / 3)
    assert M.quac_human_f1([C, C]) == 1.0


def test_quac_scores_filter_and_heq():
    preds = ["red car", "anything", "blue"]
    refs = [["red car", "red car door", "blue"],
            ["green tree", "purple sky"],  # human F1 0 < 0.4: not scored
            ["red car", "red car door", "blue"]]
    # third: F1 of "blue" against each: 0, 0, 1 -> leave-one-out: max(0, 1), max(0, 1), max(0, 0) = 2/3
    out = M.quac_scores(preds, refs)
    assert out["count"] == 2
    assert out["f1"] == pytest.approx(100 * ((2.8 / 3) + (2 / 3)) / 2)
    assert out["heq"] == pytest.approx(100.0)  # both reach the human F1 of 1.6/3
    assert M.quac_scores(["x"], [["green tree", "purple sky"]]) == {"f1": 0.0, "heq": 0.0, "count": 0}
    with pytest.raises(ValueError):
        M.quac_scores(["x"], [])


def test_mean_std():
    mean, std = M.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    values = [0.31, 0.42, 0.27, 0.35, 0.4]
    assert M.mean_std(values) == pytest.approx((statistics.mean(values), statistics.stdev(values)))
    assert M.mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        M.mean_std([])
    summary = M.summarize_templates([0.5, 0.7, 0.9])
    assert summary["mean"] == pytest.approx(70.0) and summary["std"] == pytest.approx(20.0)


def test_mc_predictions():
    # sums: -10, -12, -9.5 -> acc picks 2; per char: -1.0, -0.6, -1.9 -> acc_norm picks 1
    assert M.mc_predictions([-10.0, -12.0, -9.5], [10, 20, 5]) == (2, 1)
    assert M.mc_predictions([-1.0, -1.0], [1, 1]) == (0, 0)  # ties go to the first option
    with pytest.raises(ValueError):
        M.mc_predictions([-1.0, -2.0], [3])
    with pytest.raises(ValueError):
        M.mc_predictions([-1.0, -2.0], [3, 0])
    assert M.ppl_prediction([2.3, 1.1, 1.1]) == 1

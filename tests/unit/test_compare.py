from __future__ import annotations

import pytest

from serving.shadow import compare


def test_normalisation_ignores_case_and_whitespace_only() -> None:
    assert compare.normalize("  We the\n People ") == "we the people"
    assert compare.normalize("We the people.") != compare.normalize("We the people")


def test_token_agreement_counts_positions() -> None:
    assert compare.token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert compare.token_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert compare.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert compare.token_agreement([], []) == 1.0


def test_score_drift_is_mean_absolute_logprob_difference() -> None:
    assert compare.score_drift([-1.0, -2.0], [-1.5, -1.0]) == pytest.approx(0.75)
    assert compare.score_drift([-1.0], [-1.0]) == 0.0
    assert compare.score_drift([], []) is None
    assert compare.score_drift([-1.0], [-1.0, -2.0]) is None


def test_compare_puts_it_together() -> None:
    same = compare.compare("A b", "a  B", [1, 2], [1, 2], [-0.5, -0.1], [-0.5, -0.1])
    assert same == compare.Comparison(disagree=False, token_agreement=1.0, score_drift=0.0)
    different = compare.compare("a b", "a c", [1, 2], [1, 3], [-0.5, -0.1], [-0.7, -2.1])
    assert different.disagree
    assert different.token_agreement == 0.5
    assert different.score_drift == pytest.approx(1.1)

"""Wilson intervals and the exact McNemar test against values worked out by hand."""

import math

import pytest

from axolotl_upft.stats import mcnemar_exact, paired, wilson


def test_wilson_interval_matches_the_closed_form_values():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0, 10)
    assert low == 0 and round(high, 4) == 0.2775  # never a zero-width interval at the floor
    low, high = wilson(10, 10)
    assert round(low, 4) == 0.7225 and high == pytest.approx(1)


def test_wilson_rejects_counts_that_cannot_be_a_proportion():
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(4, 3)


def test_exact_mcnemar_is_the_two_sided_binomial_tail_of_the_discordant_pairs():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_counts_only_the_questions_one_arm_got_right():
    base = [True, True, False, False, True]
    arm = [True, False, True, True, True]
    assert paired(base, arm) == {
        "difference_pp": 20.0,
        "only_base": 1,
        "only_arm": 2,
        "mcnemar_p": mcnemar_exact(1, 2),
    }
    with pytest.raises(ValueError, match="same questions"):
        paired(base, arm[:3])

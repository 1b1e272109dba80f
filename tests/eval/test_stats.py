"""Bootstrap intervals cover at their stated rate; paired tests find real differences and not noise."""

from __future__ import annotations

import random

import pytest

from eval.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap, paired_log_ratio


@pytest.mark.parametrize("accuracy", [0.3, 0.7])
def test_intervals_cover_a_simulated_models_true_accuracy_at_the_stated_rate(accuracy):
    """400 exams of 80 items from a model that is right with probability `accuracy`: about 95% of the
    95% intervals contain it (the binomial standard error of 400 trials is 1.1%, so 0.92-0.98 is wide)."""
    rng = random.Random(7)
    trials, covered, widths = 400, 0, []
    for t in range(trials):
        outcomes = [int(rng.random() < accuracy) for _ in range(80)]
        low, high = bootstrap_ci(outcomes, samples=1000, seed=t)
        covered += low <= accuracy <= high
        widths.append(high - low)
    rate = covered / trials
    assert 0.92 <= rate <= 0.98, f"coverage {rate:.3f}"
    assert 0.15 < sum(widths) / trials < 0.25, "an 80-item interval is about ±0.1 wide"
    narrow = [bootstrap_ci([int(rng.random() < accuracy) for _ in range(80)], confidence=0.5, seed=t)
              for t in range(200)]
    assert 0.4 <= sum(lo <= accuracy <= hi for lo, hi in narrow) / 200 <= 0.62, "the stated rate is the one used"


def test_mcnemar_counts_only_the_discordant_items():
    base = [1] * 30 + [0] * 50
    same = mcnemar_exact(base, base)
    assert same == {"p_value": 1.0, "first_only": 0, "second_only": 0}
    better = [1] * 30 + [1] * 12 + [0] * 38
    result = mcnemar_exact(base, better)
    assert result["second_only"] == 12 and result["first_only"] == 0
    assert result["p_value"] == pytest.approx(2 / 2 ** 12)
    swapped = [0] * 6 + [1] * 24 + [1] * 6 + [0] * 44  # 6 lost, 6 gained: no evidence either way
    assert mcnemar_exact(base, swapped)["p_value"] == 1.0


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = random.Random(3)
    base = [int(rng.random() < 0.4) for _ in range(100)]
    gain = [1 if b else int(rng.random() < 0.5) for b in base]  # never worse, often better
    result = paired_bootstrap(base, gain, seed=1)
    assert result["delta"] > 0.2 and result["p_value"] < 0.001 and result["ci"][0] > 0
    noise = [b if rng.random() < 0.9 else 1 - b for b in base]
    assert paired_bootstrap(base, noise, seed=1)["p_value"] > 0.05
    assert paired_bootstrap(base, base)["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_paired_log_ratio_compares_perplexity_window_by_window():
    base = [(300.0 + 5 * i, 100) for i in range(20)]
    better = [(nll * 0.8, n) for nll, n in base]
    result = paired_log_ratio(base, better, seed=0)
    assert result["delta"] == pytest.approx(-0.2 * sum(x for x, _ in base) / 2000)
    assert result["ci"][1] < 0 and result["p_value"] < 0.01
    assert paired_log_ratio(base, base)["p_value"] == 1.0

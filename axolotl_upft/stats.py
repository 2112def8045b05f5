"""Error bars for accuracy: Wilson score interval and the exact (binomial) McNemar test for paired arms."""

import math


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion correct / n, as fractions in [0, 1]."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson needs 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs (right only in a, right only in b) under
    Binomial(only_a + only_b, 1/2); 1.0 when there is no discordant pair."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    low = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(base: list[bool], arm: list[bool]) -> dict:
    """Paired comparison of two arms' per-question correctness (same questions, same order)."""
    if len(base) != len(arm):
        raise ValueError(f"paired arms must grade the same questions: {len(base)} vs {len(arm)} rows")
    only_base = sum(b and not a for b, a in zip(base, arm))
    only_arm = sum(a and not b for b, a in zip(base, arm))
    return {
        "difference_pp": round(100 * (only_arm - only_base) / len(base), 2),
        "only_base": only_base,
        "only_arm": only_arm,
        "mcnemar_p": mcnemar_exact(only_base, only_arm),
    }

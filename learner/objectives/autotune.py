"""Choosing VESPO's kernel sharpness from a target effective sample size (ESS).

The paper tunes (k, lambda) by hand and lists that as a limitation. Scaling both by t keeps
the kernel's peak at W = k / lambda and raises it to a power: phi_t(W) = phi_1(W)^t. At t -> 0
every sequence gets weight 1 (the plain, uncorrected policy gradient, ESS = 1); as t grows
the kernel suppresses off-peak weights harder and the normalised ESS of the gradient
coefficients, (sum phi)^2 / (n sum phi^2), falls. Given a target ESS, we take the largest t
whose ESS still meets it: the strongest off-policy correction the batch can afford.
"""

from __future__ import annotations

import numpy as np

T_MIN, T_MAX = 1e-3, 1e3


def ess(weights: np.ndarray) -> float:
    """Normalised effective sample size in [0, 1]: 1 when all weights are equal, 0 when all are 0."""
    total, sq = float(np.sum(weights)), float(np.sum(np.square(weights)))
    return total * total / (len(weights) * sq) if sq > 0 else 0.0


def shape_scale(log_phi_base: np.ndarray, target: float, iters: int = 40) -> float:
    """Largest t in [T_MIN, T_MAX] with ess(exp(t * log_phi_base)) >= target (bisection in log t).

    `log_phi_base` is log phi of each valid sequence under the configured (k, lambda).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target ESS must be in (0, 1], got {target}")
    if len(log_phi_base) == 0:
        return 1.0

    def ess_at(t: float) -> float:
        z = t * log_phi_base
        return ess(np.exp(z - z.max()))  # ESS is scale-free: shift for stability

    if ess_at(T_MAX) >= target:
        return T_MAX
    if ess_at(T_MIN) < target:
        return T_MIN
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess_at(float(np.exp(mid))) >= target else (lo, mid)
    return float(np.exp(lo))

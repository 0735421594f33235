"""NN+KN: a neural model linearly interpolated with a Kneser-Ney model, token by token (Mikolov et al. 2011,
Table 2's "+KN5" column):

    p(w | h) = lambda * p_NN(w | h) + (1 - lambda) * p_KN(w | h)

lambda is tuned on the validation set and then applied to the test set. Validation perplexity is convex
in lambda (-log of a function linear in lambda), so a golden-section search finds the optimum.
"""

from __future__ import annotations

import math

import numpy as np

from bench.errors import BenchError

GOLDEN = (math.sqrt(5) - 1) / 2


def mixture_perplexity(lam: float, nn_log_p: np.ndarray, kn_log_p: np.ndarray) -> float:
    log_p = np.logaddexp(math.log(lam) + nn_log_p if lam > 0 else -np.inf,
                         math.log1p(-lam) + kn_log_p if lam < 1 else -np.inf)
    return float(np.exp(-np.mean(log_p)))


def tune_interpolation(valid: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       tolerance: float = 1e-4) -> dict:
    """lambda minimising validation perplexity, and the mixture's valid/test perplexities.

    `valid` and `test` are pairs (NN log p, KN log p) of the same tokens in the same order."""
    for split, (nn, kn) in (("valid", valid), ("test", test)):
        if nn.shape != kn.shape:
            raise BenchError(f"NN+KN: the models scored different token streams on {split} "
                             f"({nn.size} vs {kn.size} tokens): vocabulary or tokenization differ")
    low, high = 0.0, 1.0
    while high - low > tolerance:
        a, b = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
        if mixture_perplexity(a, *valid) < mixture_perplexity(b, *valid):
            high = b
        else:
            low = a
    lam = (low + high) / 2
    return {"kn_lambda": lam, "nn_kn_valid_ppl": mixture_perplexity(lam, *valid),
            "nn_kn_test_ppl": mixture_perplexity(lam, *test)}

"""How close two float32 model outputs must be to count as "the same model on the same pixels".

Every comparison of model outputs in the tests (probabilities, pooled features, scores from the
Spark and the Spark-free paths, one image alone or in a batch, the service and the batch job)
uses these constants, so the reasoning lives in one place.

Why not 1e-9: the backbones compute in float32 (unit round-off 6e-8). TensorFlow picks its
convolution kernels by CPU (oneDNN on AVX-512 machines, Eigen on AVX2-only ones unless
``TF_ENABLE_ONEDNN_OPTS=1``), and by batch composition; each choice sums in another order.
Measured with ``bench/probe_float_noise.py`` on the 16 sample X-rays (InceptionV3 ``mixed5``,
299 px) on an AVX2 machine: oneDNN vs Eigen, and batch 16 vs batch 1, differ by at most 7e-7
absolute (1.3e-5 relative) on pooled features and 1.8e-6 on a logistic-regression probability.
1e-9 therefore held on one kind of CPU only.

Why these bounds still catch real mistakes: the smallest one measured, the image shifted by one
pixel (a resize slip), moves features by 7e-2 and probabilities by 2e-1; another feature layer,
random weights or a missing ``preprocess_input`` move features by > 3 and probabilities by > 0.99.
The bounds sit ~15-50x above the kernel noise and > 1000x below the smallest real mistake.
"""

from __future__ import annotations

import numpy as np
import pytest

# |p_a - p_b| for probabilities in [0, 1] from the same model on the same decoded pixels.
PROBABILITY_ATOL = 1e-4

# Pooled backbone features (post-ReLU activations, O(0.1..10)).
FEATURE_RTOL = 1e-4
FEATURE_ATOL = 1e-5


def same_probability(expected: float):
    """``pytest.approx`` for one probability: ``assert got == same_probability(want)``."""
    return pytest.approx(expected, abs=PROBABILITY_ATOL)


def assert_same_probabilities(got, expected) -> None:
    np.testing.assert_allclose(
        np.asarray(got, dtype=float), np.asarray(expected, dtype=float), rtol=0, atol=PROBABILITY_ATOL
    )


def assert_same_features(got, expected) -> None:
    np.testing.assert_allclose(
        np.asarray(got, dtype=float), np.asarray(expected, dtype=float), rtol=FEATURE_RTOL, atol=FEATURE_ATOL
    )


def clear_of_threshold(probability: float, threshold: float) -> bool:
    """Whether a class comparison is meaningful: the score is further from the threshold than the noise."""
    return abs(probability - threshold) > PROBABILITY_ATOL

"""Gaussian helper math shared by the diffusion code.

Everything here works on torch tensors (or scalars that broadcast against
them) and returns per-element values; callers do their own reductions.
"""

import math

import torch as th


def _as_tensor_like(value, reference):
    """Turn a scalar or array into a tensor matching `reference`'s device/dtype."""
    if isinstance(value, th.Tensor):
        return value
    return th.tensor(value, dtype=reference.dtype, device=reference.device)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Any argument may be a scalar as long as at least one is a tensor; the
    result broadcasts like ordinary tensor arithmetic.
    """
    reference = None
    for arg in (mean1, logvar1, mean2, logvar2):
        if isinstance(arg, th.Tensor):
            reference = arg
            break
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1 = _as_tensor_like(logvar1, reference)
    logvar2 = _as_tensor_like(logvar2, reference)
    # 0.5 * [log(s2^2/s1^2) + (s1^2 + (m1-m2)^2) / s2^2 - 1]
    return 0.5 * (
        logvar2
        - logvar1
        - 1.0
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Fast tanh-based approximation of the standard normal CDF."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * th.pow(x, 3))))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """Log density of `x` under N(means, exp(log_scales)^2), elementwise (nats)."""
    centered = x - means
    normalized = centered * th.exp(-log_scales)
    return th.distributions.Normal(th.zeros_like(x), th.ones_like(x)).log_prob(normalized) - log_scales


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log probability of 8-bit data scaled to [-1, 1] under a binned Gaussian.

    Each pixel value owns a bin of width 2/255 centred on it; the outermost
    bins extend to -inf / +inf so the probabilities sum to one.

    :param x: data in [-1, 1] (exactly representable 8-bit levels).
    :param means: Gaussian means, same shape as x.
    :param log_scales: log standard deviations, same shape as x.
    :return: elementwise log probabilities in nats.
    """
    assert x.shape == means.shape == log_scales.shape
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_upper = th.log(cdf_upper.clamp(min=1e-12))  # log P(X <= upper edge)
    log_survival_lower = th.log((1.0 - cdf_lower).clamp(min=1e-12))  # log P(X > lower edge)
    log_bin_mass = th.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return th.where(
        x < -0.999,
        log_cdf_upper,
        th.where(x > 0.999, log_survival_lower, log_bin_mass),
    )


def mean_flat(tensor):
    """Average over every dimension except the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]

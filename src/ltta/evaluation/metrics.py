"""Classification metrics of the paper's tables: error, NLL, ECE, and the corruption means.

Every function takes predicted probabilities ``probs [N,K]`` and integer labels ``y [N]`` as torch
tensors (on any device) or numpy arrays, computes in float64, and returns a Python float, so the
same numbers come out on CPU and CUDA and go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
#: ``errors[corruption][severity] -> error in percent``, the shape of every corruption result.
CorruptionErrors = Mapping[str, Mapping[int, float]]

NLL_EPS = 1e-12  # probabilities are clamped here before the log, so a confident miss costs 27.6 nats
ROBUSTBENCH_SEVERITY = 5  # the one severity RobustBench's CIFAR-10-C leaderboard scores


def _check(probs: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as tensors on the probabilities' device, validated: [N,K] float and [N] labels in range."""
    p = torch.as_tensor(probs)
    labels = torch.as_tensor(y, device=p.device)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, K] class probabilities, got shape {tuple(p.shape)}")
    if labels.ndim != 1 or labels.shape[0] != p.shape[0]:
        raise ValueError(f"labels must be [N] with N = {p.shape[0]} (rows of probs), got shape {tuple(labels.shape)}")
    if p.shape[0] == 0:
        raise ValueError("cannot score an empty set: probs has 0 rows")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= p.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return p.double(), labels


def error_rate(probs: ArrayLike, y: ArrayLike) -> float:
    """Top-1 error in percent (argmax; ties go to the lowest class index, torch.argmax's rule)."""
    p, labels = _check(probs, y)
    return 100.0 * float((p.argmax(dim=1) != labels).double().mean())


def nll(probs: ArrayLike, y: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class, in nats, with probabilities clamped at 1e-12."""
    p, labels = _check(probs, y)
    p_true = p.gather(1, labels[:, None]).squeeze(1)
    return float(-p_true.clamp_min(NLL_EPS).log().mean())


def ece(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error in percent (Guo et al., ICML 2017, eq. 3).

    Confidence is the top probability; bins are ``n_bins`` equal-width intervals ``(lo, hi]`` of
    [0, 1], and ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|. The half-open convention (a
    confidence on a boundary belongs to the lower bin) is that of the reference implementation
    gpleiss/temperature_scaling (temperature_scaling.py, ``_ECELoss``); here one bucketize call
    replaces its per-bin loop.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    p, labels = _check(probs, y)
    conf, pred = p.max(dim=1)
    correct = (pred == labels).double()
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=p.device)[1:-1]
    # right=False: index i such that inner[i-1] < conf <= inner[i], i.e. bins (lo, hi].
    bins = torch.bucketize(conf, inner, right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    # sum_b |B|/n * |acc_b - conf_b| = sum_b |acc_sum_b - conf_sum_b| / n (empty bins add 0).
    return 100.0 * float((acc_sum - conf_sum).abs().sum() / conf.shape[0])


def _severities(errors: CorruptionErrors, corruption: str, what: str) -> Mapping[int, float]:
    if corruption not in errors:
        raise ValueError(
            f"{what} has no result for corruption {corruption!r} (has {sorted(errors)}); "
            "evaluate it or leave it out of the corruption list"
        )
    by_severity = errors[corruption]
    if not by_severity:
        raise ValueError(f"{what} has no severities for corruption {corruption!r}")
    return by_severity


def mean_corruption_error(errors: CorruptionErrors, corruptions: Sequence[str]) -> float:
    """Unnormalised mean error over ``corruptions`` and their severities, in percent.

    The number AugMix (google-research/augmix cifar.py ``test_c``) and the paper report as
    "corruption error": each corruption's error over all its severities (equal-sized sets, so the
    mean over severities), then the mean over corruptions.
    """
    if not corruptions:
        raise ValueError("mean_corruption_error needs at least one corruption")
    per_corruption = []
    for c in corruptions:
        by_severity = _severities(errors, c, "errors")
        per_corruption.append(sum(by_severity.values()) / len(by_severity))
    return float(sum(per_corruption) / len(per_corruption))


def relative_mce(errors: CorruptionErrors, baseline_errors: CorruptionErrors, corruptions: Sequence[str]) -> float:
    """Hendrycks & Dietterich's mCE (ICLR 2019, sec. 3), in percent, relative to a baseline's errors.

    CE_c = sum_s E_{s,c} / sum_s E_{s,c}^baseline; mCE = mean_c CE_c. Both must cover the same
    severities of each corruption, and the baseline needs a non-zero error on each corruption
    (strict: it raises otherwise; :func:`relative_mce_where_defined` is the report's fallback).
    """
    if not corruptions:
        raise ValueError("relative_mce needs at least one corruption")
    ratios = []
    for c in corruptions:
        mine = _severities(errors, c, "errors")
        base = _severities(baseline_errors, c, "baseline_errors")
        if set(mine) != set(base):
            raise ValueError(
                f"corruption {c!r}: severities {sorted(mine)} differ from the baseline's {sorted(base)}; "
                "evaluate both on the same severities"
            )
        denom = sum(base.values())
        if denom <= 0:
            raise ValueError(
                f"corruption {c!r}: the baseline makes no errors at any severity, so CE is undefined; "
                "use a weaker baseline or report the unnormalised mean_corruption_error"
            )
        ratios.append(sum(mine[s] for s in base) / denom)
    return 100.0 * float(sum(ratios) / len(ratios))


def zero_baseline_corruptions(baseline_errors: CorruptionErrors, corruptions: Sequence[str]) -> list[str]:
    """The corruptions on which the baseline makes no error at any severity, in the given order:
    there CE_c divides by zero. A strong baseline on a small test set does this (e.g. on snow)."""
    return [c for c in corruptions if sum(_severities(baseline_errors, c, "baseline_errors").values()) <= 0]


def relative_mce_where_defined(
    errors: CorruptionErrors, baseline_errors: CorruptionErrors, corruptions: Sequence[str]
) -> tuple[float | None, list[str]]:
    """:func:`relative_mce` over the corruptions where it is defined, and the ones left out.

    The fallback for a baseline with zero summed error on some corruptions: those corruptions are
    dropped from the mean (their CE_c is 0/0 or x/0, no number) and the mean is over the rest, so
    one clean corruption does not blank the whole column; the caller must say which were dropped.
    None when the baseline errs on none of ``corruptions`` (or there are none).
    """
    excluded = zero_baseline_corruptions(baseline_errors, corruptions)
    defined = [c for c in corruptions if c not in excluded]
    return (relative_mce(errors, baseline_errors, defined) if defined else None), excluded


def accuracy_at_severity(errors: CorruptionErrors, corruptions: Sequence[str], severity: int) -> float:
    """100 - the mean error over ``corruptions`` at one ``severity``, in percent.

    RobustBench's corruption accuracy (its CIFAR-10-C leaderboard: severity 5, the 15 benchmark
    corruptions), so a number from here can be held next to it. Every corruption needs that severity.
    """
    if not corruptions:
        raise ValueError("accuracy_at_severity needs at least one corruption")
    per_corruption = []
    for c in corruptions:
        by_severity = _severities(errors, c, "errors")
        if severity not in by_severity:
            raise ValueError(f"corruption {c!r} has no result at severity {severity} (has {sorted(by_severity)})")
        per_corruption.append(by_severity[severity])
    return 100.0 - float(sum(per_corruption) / len(per_corruption))


def baseline_covers(baseline_errors: CorruptionErrors, corruptions: Sequence[str]) -> bool:
    """Whether :func:`relative_mce_where_defined` can be computed against this baseline: a result at
    some severity for every corruption (zero-error corruptions it leaves out and names)."""
    return bool(corruptions) and all(baseline_errors.get(c) for c in corruptions)

"""Least-squares fits of the cost model's terms from measured times (pure numpy, no torch).

Compute (degree 1, every rank busy):  ``t = a1 * sum L^2 + a2 * sum L + b``, fitted with
non-negative least squares on *relative* residuals (each row divided by its measured time), so
a 20 ms and a 2 s micro-batch count alike: the planner cares about ratios, and the validation
reports relative errors.

Communication (degree d > 1, one attention mode): the measured time minus the compute the fit
predicts for that degree, ``(a1 * sum L^2 + a2 * sum L) / d + b``, is attributed to the mode's
per-token communication cost ``c(d)`` (ms per token of the group): ``residual = c(d) * sum L``, a
one-parameter least squares through the origin, clamped at >= 0. The bandwidth the CostModel
stores is then the *effective* bandwidth that reproduces ``c(d)`` with the model's analytic
volume (it includes latency, layout and sharding overhead, not just wire speed).

Link micro-benchmarks: ``t = latency + bytes / bandwidth`` per degree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ComputeFit:
    a1: float
    """ms per token^2."""
    a2: float
    """ms per token."""
    b: float
    """ms per micro-batch (group)."""
    rel_errors: list = field(default_factory=list)
    """(predicted - measured) / measured per sample."""

    @property
    def median_abs_rel(self) -> float:
        return float(np.median(np.abs(self.rel_errors))) if self.rel_errors else float("nan")

    @property
    def max_abs_rel(self) -> float:
        return float(np.max(np.abs(self.rel_errors))) if self.rel_errors else float("nan")

    def predict(self, lengths, sp: int = 1) -> float:
        L = np.asarray(lengths, dtype=np.float64)
        return float((self.a1 * (L * L).sum() + self.a2 * L.sum()) / sp + self.b)


def _check_samples(samples) -> None:
    if len(samples) < 3:
        raise ValueError(f"a compute fit needs at least 3 timed shapes, got {len(samples)}")
    for lengths, ms in samples:
        if not len(lengths) or min(lengths) < 1:
            raise ValueError(f"every timed shape needs positive lengths, got {list(lengths)[:8]}")
        if not ms > 0:
            raise ValueError(f"measured times must be > 0 ms, got {ms} for lengths {list(lengths)[:8]}")


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    try:
        from scipy.optimize import nnls
        return nnls(A, y)[0]
    except ImportError:  # pragma: no cover - scipy is a dependency; keep a fallback anyway
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return np.clip(coef, 0.0, None)


def fit_compute(samples) -> ComputeFit:
    """``samples``: [(lengths, measured ms)] -> non-negative (a1, a2, b) minimising relative error."""
    _check_samples(samples)
    rows = np.array([[float(np.sum(np.square(np.asarray(L, dtype=np.float64)))), float(np.sum(L)), 1.0]
                     for L, _ in samples])
    y = np.array([float(ms) for _, ms in samples])
    w = 1.0 / y
    # scale columns so NNLS is well conditioned (sum L^2 is ~1e6 x sum L)
    scale = rows.max(axis=0)
    coef = _nnls(rows / scale * w[:, None], y * w) / scale
    fit = ComputeFit(float(coef[0]), float(coef[1]), float(coef[2]))
    fit.rel_errors = [(fit.predict(L) - ms) / ms for L, ms in samples]
    return fit


def fit_comm_per_token(samples, compute: ComputeFit, sp: int) -> tuple[float, list]:
    """``samples``: [(lengths, measured ms)] at degree ``sp`` -> (ms per token, relative errors of
    the full prediction compute/sp + b + c * sum L)."""
    if sp < 2:
        raise ValueError(f"communication is fitted for SP degrees >= 2, got {sp}")
    if not samples:
        raise ValueError(f"no timed shapes for SP degree {sp}")
    tok = np.array([float(np.sum(L)) for L, _ in samples])
    res = np.array([ms - compute.predict(L, sp) for L, ms in samples])
    w = 1.0 / np.array([ms for _, ms in samples])  # relative weighting, as the compute fit
    c = float(np.sum(w * w * res * tok) / np.sum(w * w * tok * tok))
    c = max(c, 0.0)
    errs = [(compute.predict(L, sp) + c * float(np.sum(L)) - ms) / ms for L, ms in samples]
    return c, errs


def fit_link(sizes_bytes, times_ms) -> tuple[float, float]:
    """``t = latency + bytes / bw`` -> (latency ms, bandwidth GB/s); needs >= 2 sizes."""
    x = np.asarray(sizes_bytes, dtype=np.float64)
    y = np.asarray(times_ms, dtype=np.float64)
    if x.size < 2 or x.size != y.size:
        raise ValueError(f"a link fit needs >= 2 (size, time) pairs, got {x.size} sizes and {y.size} times")
    A = np.stack([np.ones_like(x), x / 1e6], axis=1)  # ms, ms per MB
    lat, per_mb = _nnls(A, y)
    bw = 1.0 / per_mb if per_mb > 0 else float("inf")  # MB/ms == GB/s
    return float(lat), float(bw)

"""Least-squares fits of the cost model's terms from measured times (pure numpy, no torch).

Compute (degree 1, every rank busy):  ``t = a1 * sum L^2 + a2 * sum L + s * n + b`` (``n``: the
number of documents in the micro-batch, ``s``: the CostModel's ``per_sequence_ms``, e.g. the CPU
attention's loop over documents), fitted with non-negative least squares on *relative* residuals
(each row divided by its measured time), so a 20 ms and a 2 s micro-batch count alike: the planner
cares about ratios, and the validation reports relative errors. Each coefficient's uncertainty is
its jackknife standard error (refit leaving each shape out), reported next to it.

Communication (degree d > 1, one attention mode): the measured time minus the compute the fit
predicts for that degree, ``(a1 * sum L^2 + a2 * sum L) / d + s * n + b``, is attributed to the
mode's per-token communication cost ``c(d)`` (ms per token of the group): ``residual = c(d) * sum L``,
a one-parameter least squares through the origin, clamped at >= 0. The bandwidth the CostModel
stores is then the *effective* bandwidth that reproduces ``c(d)`` with the model's analytic
volume (layout and sharding overhead, not just wire speed). The joint fit (:func:`fit_joint`, the
profiler's default) also fits a fixed latency per group of each degree and mode (collective launch
latency: on gloo ~16 all-to-all calls per micro-batch whatever the size), which the sequential
one-parameter fit folds into ``c(d)``.

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
    per_seq: float = 0.0
    """ms per document in the group (not divided by the degree): CostModel.per_sequence_ms."""
    rel_errors: list = field(default_factory=list)
    """(predicted - measured) / measured per sample."""
    stderr: dict = field(default_factory=dict)
    """Jackknife standard error of each coefficient (keys a1, a2, per_seq, b), same units."""

    @property
    def median_abs_rel(self) -> float:
        return float(np.median(np.abs(self.rel_errors))) if self.rel_errors else float("nan")

    @property
    def max_abs_rel(self) -> float:
        return float(np.max(np.abs(self.rel_errors))) if self.rel_errors else float("nan")

    def predict(self, lengths, sp: int = 1) -> float:
        L = np.asarray(lengths, dtype=np.float64)
        return float((self.a1 * (L * L).sum() + self.a2 * L.sum()) / sp + self.per_seq * L.size + self.b)

    @property
    def coefficients(self) -> dict:
        return {"a1": self.a1, "a2": self.a2, "per_seq": self.per_seq, "b": self.b}


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


def _fit_rows(samples, per_sequence: bool) -> np.ndarray:
    rows = np.array([[float(np.sum(np.square(np.asarray(L, dtype=np.float64)))), float(np.sum(L)),
                      float(len(L)), 1.0] for L, _ in samples])
    y = np.array([float(ms) for _, ms in samples])
    w = 1.0 / y
    cols = [0, 1, 2, 3] if per_sequence else [0, 1, 3]
    A = rows[:, cols]
    # scale columns so NNLS is well conditioned (sum L^2 is ~1e6 x sum L)
    scale = A.max(axis=0)
    coef = np.zeros(4)
    coef[cols] = _nnls(A / scale * w[:, None], y * w) / scale
    return coef


def fit_compute(samples, per_sequence: bool = True) -> ComputeFit:
    """``samples``: [(lengths, measured ms)] -> non-negative (a1, a2, per_seq, b) minimising relative
    error; ``per_sequence=False`` fixes per_seq at 0 (the paper's three-term form)."""
    samples = [(list(L), float(ms)) for L, ms in samples]
    _check_samples(samples)
    coef = _fit_rows(samples, per_sequence)
    fit = ComputeFit(float(coef[0]), float(coef[1]), float(coef[3]), per_seq=float(coef[2]))
    fit.rel_errors = [(fit.predict(L) - ms) / ms for L, ms in samples]
    n = len(samples)
    if n > (4 if per_sequence else 3):  # jackknife: refit without each shape
        loo = np.array([_fit_rows(samples[:i] + samples[i + 1:], per_sequence) for i in range(n)])
        se = np.sqrt((n - 1) / n * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
        fit.stderr = {"a1": float(se[0]), "a2": float(se[1]), "per_seq": float(se[2]), "b": float(se[3])}
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


def _joint_rows(samples, keys, per_sequence: bool, latency: bool = True, key_docs: bool = False):
    rows = []
    for L, _, sp, key in samples:
        L = np.asarray(L, dtype=np.float64)
        row = [float((L * L).sum()) / sp, float(L.sum()) / sp, float(L.size) if per_sequence else 0.0, 1.0]
        row += [float(L.sum()) if key == k else 0.0 for k in keys]
        if latency:  # indicator: the group is of this key's degree and mode (its fixed latency)
            row += [1.0 if key == k else 0.0 for k in keys]
        if key_docs:  # extra time per document in this key's groups, beyond per_seq (CostModel.per_sequence_comm_ms)
            row += [float(L.size) if key == k else 0.0 for k in keys]
        rows.append(row)
    return np.array(rows)


def _joint_coef(samples, keys, per_sequence: bool, latency: bool = True, key_docs: bool = False) -> np.ndarray:
    A = _joint_rows(samples, keys, per_sequence, latency, key_docs)
    y = np.array([float(ms) for _, ms, _, _ in samples])
    w = 1.0 / y
    live = [j for j in range(A.shape[1]) if np.any(A[:, j])]
    scale = A[:, live].max(axis=0)
    coef = np.zeros(A.shape[1])
    coef[live] = _nnls(A[:, live] / scale * w[:, None], y * w) / scale
    return coef


def fit_joint(compute_samples, comm_samples: dict, per_sequence: bool = True, group_latency: bool = True,
              key_docs: bool = False):
    """One NNLS over every timed shape: degree-1 shapes ``(lengths, ms)`` and, per ``"mode:d"`` key,
    shapes at degree d. The compute terms (a1, a2, per_seq, b) are shared by all degrees, as the
    CostModel shares them; each key adds its own communication ms per token and (``group_latency``)
    its own fixed latency per group (CostModel.group_latency_ms: an indicator column that is 1 for
    the key's shapes). Both are identified only if each key's shapes span small and large token
    counts (the intercept and the slope of the residual over the degree-1 prediction). ``key_docs``
    adds, per key, an extra ms per document of the group beyond ``per_seq`` (``"extra_doc_ms"``; the
    CostModel's per_sequence_comm_ms["mode:d"]: degree- and mode-dependent per-document costs). Relative
    residuals, as :func:`fit_compute`; jackknife standard errors (refit leaving each shape out).

    Returns ``(ComputeFit, {key: {"ms_per_token", "stderr", "latency_ms", "latency_stderr",
    "rel_errors"}})``; the ComputeFit's ``rel_errors`` are those of the degree-1 shapes."""
    compute_samples = [(list(L), float(ms)) for L, ms in compute_samples]
    _check_samples(compute_samples)
    keys = sorted(comm_samples)
    samples = [(L, ms, 1, None) for L, ms in compute_samples]
    for k in keys:
        sp = int(k.split(":")[1])
        if sp < 2:
            raise ValueError(f"communication is fitted for SP degrees >= 2, got {sp} in {k!r}")
        _check_samples(list(comm_samples[k]) * 3)  # values only (a key may have < 3 shapes)
        if group_latency and len({sum(L) for L, _ in comm_samples[k]}) < 2:
            raise ValueError(f"{k!r}: a per-token cost and a group latency need shapes of at least 2 token "
                             f"counts, got {sorted({sum(L) for L, _ in comm_samples[k]})}")
        samples += [(list(L), float(ms), sp, k) for L, ms in comm_samples[k]]
    coef = _joint_coef(samples, keys, per_sequence, group_latency, key_docs)
    fit = ComputeFit(float(coef[0]), float(coef[1]), float(coef[3]), per_seq=float(coef[2]))
    n = len(samples)
    loo = np.array([_joint_coef(samples[:i] + samples[i + 1:], keys, per_sequence, group_latency, key_docs)
                    for i in range(n)])
    se = np.sqrt((n - 1) / n * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
    fit.stderr = {"a1": float(se[0]), "a2": float(se[1]), "per_seq": float(se[2]), "b": float(se[3])}
    fit.rel_errors = [(fit.predict(L) - ms) / ms for L, ms in compute_samples]
    comm = {}
    nk = len(keys)
    for j, k in enumerate(keys):
        c = float(coef[4 + j])
        lat = float(coef[4 + nk + j]) if group_latency else 0.0
        jd = 4 + (2 if group_latency else 1) * nk + j
        doc = float(coef[jd]) if key_docs else 0.0
        errs = [(fit.predict(L, sp) + c * float(np.sum(L)) + lat + doc * len(L) - ms) / ms
                for L, ms, sp, kk in samples if kk == k]
        comm[k] = {"ms_per_token": c, "stderr": float(se[4 + j]), "latency_ms": lat,
                   "latency_stderr": float(se[4 + nk + j]) if group_latency else None, "rel_errors": errs}
        if key_docs:
            comm[k].update(extra_doc_ms=doc, extra_doc_stderr=float(se[jd]))
    return fit, comm

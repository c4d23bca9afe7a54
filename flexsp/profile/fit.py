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

from flexsp.errors import UserError


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
        raise UserError(f"a compute fit needs at least 3 timed shapes, got {len(samples)}")
    for lengths, ms in samples:
        if not len(lengths) or min(lengths) < 1:
            raise UserError(f"every timed shape needs positive lengths, got {list(lengths)[:8]}")
        if not ms > 0:
            raise UserError(f"measured times must be > 0 ms, got {ms} for lengths {list(lengths)[:8]}")


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    try:
        from scipy.optimize import nnls

        return nnls(A, y)[0]
    except ImportError:  # pragma: no cover - scipy is a dependency; keep a fallback anyway
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return np.clip(coef, 0.0, None)


def _fit_rows(samples, per_sequence: bool) -> np.ndarray:
    rows = np.array(
        [
            [float(np.sum(np.square(np.asarray(L, dtype=np.float64)))), float(np.sum(L)), float(len(L)), 1.0]
            for L, _ in samples
        ]
    )
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
        loo = np.array([_fit_rows(samples[:i] + samples[i + 1 :], per_sequence) for i in range(n)])
        se = np.sqrt((n - 1) / n * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
        fit.stderr = {"a1": float(se[0]), "a2": float(se[1]), "per_seq": float(se[2]), "b": float(se[3])}
    return fit


def fit_comm_per_token(samples, compute: ComputeFit, sp: int) -> tuple[float, list]:
    """``samples``: [(lengths, measured ms)] at degree ``sp`` -> (ms per token, relative errors of
    the full prediction compute/sp + b + c * sum L)."""
    if sp < 2:
        raise UserError(f"communication is fitted for SP degrees >= 2, got {sp}")
    if not samples:
        raise UserError(f"no timed shapes for SP degree {sp}")
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
        raise UserError(f"a link fit needs >= 2 (size, time) pairs, got {x.size} sizes and {y.size} times")
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
        if (
            key_docs
        ):  # extra time per document in this key's groups, beyond per_seq (CostModel.per_sequence_comm_ms)
            row += [float(L.size) if key == k else 0.0 for k in keys]
        rows.append(row)
    return np.array(rows)


def _joint_coef(
    samples, keys, per_sequence: bool, latency: bool = True, key_docs: bool = False
) -> np.ndarray:
    A = _joint_rows(samples, keys, per_sequence, latency, key_docs)
    y = np.array([float(ms) for _, ms, _, _ in samples])
    w = 1.0 / y
    live = [j for j in range(A.shape[1]) if np.any(A[:, j])]
    scale = A[:, live].max(axis=0)
    coef = np.zeros(A.shape[1])
    coef[live] = _nnls(A[:, live] / scale * w[:, None], y * w) / scale
    return coef


def fit_joint(
    compute_samples,
    comm_samples: dict,
    per_sequence: bool = True,
    group_latency: bool = True,
    key_docs: bool = False,
):
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
            raise UserError(f"communication is fitted for SP degrees >= 2, got {sp} in {k!r}")
        _check_samples(list(comm_samples[k]) * 3)  # values only (a key may have < 3 shapes)
        if group_latency and len({sum(L) for L, _ in comm_samples[k]}) < 2:
            raise UserError(
                f"{k!r}: a per-token cost and a group latency need shapes of at least 2 token "
                f"counts, got {sorted({sum(L) for L, _ in comm_samples[k]})}"
            )
        samples += [(list(L), float(ms), sp, k) for L, ms in comm_samples[k]]
    coef = _joint_coef(samples, keys, per_sequence, group_latency, key_docs)
    fit = ComputeFit(float(coef[0]), float(coef[1]), float(coef[3]), per_seq=float(coef[2]))
    n = len(samples)
    loo = np.array(
        [
            _joint_coef(samples[:i] + samples[i + 1 :], keys, per_sequence, group_latency, key_docs)
            for i in range(n)
        ]
    )
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
        errs = [
            (fit.predict(L, sp) + c * float(np.sum(L)) + lat + doc * len(L) - ms) / ms
            for L, ms, sp, kk in samples
            if kk == k
        ]
        comm[k] = {
            "ms_per_token": c,
            "stderr": float(se[4 + j]),
            "latency_ms": lat,
            "latency_stderr": float(se[4 + nk + j]) if group_latency else None,
            "rel_errors": errs,
        }
        if key_docs:
            comm[k].update(extra_doc_ms=doc, extra_doc_stderr=float(se[jd]))
    return fit, comm


# -- depth: per-layer and fixed (embedding / head / loss) parts ----------------------------------------
_LAYER = ("a1", "a2", "per_seq", "b")
_FIXED = ("a2", "per_seq", "b")


def _depth_rows(samples, keys, per_sequence: bool, latency: bool, key_docs: bool, two: bool) -> np.ndarray:
    """Rows of the depth-aware joint fit. A sample ``(lengths, ms, sp, key, n)`` ran a model of ``n``
    layers in a group of degree ``sp`` (key None: degree 1). Columns: per layer a1, a2, per_seq, b
    (times n); with ``two`` depths the fixed part a2, per_seq, b (embedding, head, loss: once per
    model); per key (per layer, SP communication is issued by every attention layer): ms per token,
    group latency, extra ms per document."""
    rows = []
    for L, _, sp, key, n in samples:
        L = np.asarray(L, dtype=np.float64)
        s2, s1, docs = float((L * L).sum()), float(L.sum()), float(L.size)
        d = docs if per_sequence else 0.0
        row = [n * s2 / sp, n * s1 / sp, n * d, float(n)]
        if two:
            row += [s1 / sp, d, 1.0]
        row += [n * s1 if key == k else 0.0 for k in keys]
        if latency:
            row += [float(n) if key == k else 0.0 for k in keys]
        if key_docs:
            row += [n * docs if key == k else 0.0 for k in keys]
        rows.append(row)
    return np.array(rows)


def _depth_coef(samples, keys, per_sequence, latency, key_docs, two) -> np.ndarray:
    A = _depth_rows(samples, keys, per_sequence, latency, key_docs, two)
    y = np.array([float(s[1]) for s in samples])
    w = 1.0 / y
    live = [j for j in range(A.shape[1]) if np.any(A[:, j])]
    scale = A[:, live].max(axis=0)
    coef = np.zeros(A.shape[1])
    coef[live] = _nnls(A[:, live] / scale * w[:, None], y * w) / scale
    return coef


@dataclass
class DepthFit:
    """Coefficients per transformer layer and of the fixed part, from shapes timed at one or two
    depths; :meth:`compute_at` / :meth:`comm_at` give the CostModel's terms for any depth (with
    jackknife standard errors of the scaled values). One depth: only that depth (no split)."""

    depths: list
    keys: list
    coef: np.ndarray
    loo: np.ndarray | None
    flags: tuple
    """(per_sequence, latency, key_docs, two)."""
    rel_errors: list = field(default_factory=list)
    """Relative errors of the degree-1 samples, in input order."""
    comm_rel_errors: dict = field(default_factory=dict)
    comm_fixed: dict | None = None
    """Sequential fit (joint_fit=False): per key (ms per token per layer, relative errors)."""

    @property
    def two(self) -> bool:
        return self.flags[3]

    def _base(self) -> int:
        return 7 if self.two else 4

    def layer_terms(self, vec=None) -> dict:
        v = self.coef if vec is None else vec
        return dict(zip(_LAYER, (float(x) for x in v[:4])))

    def fixed_terms(self, vec=None) -> dict:
        v = self.coef if vec is None else vec
        return dict(zip(_FIXED, (float(x) for x in v[4:7]))) if self.two else dict.fromkeys(_FIXED, 0.0)

    def _check(self, depth: int) -> None:
        if not self.two and depth != self.depths[0]:
            raise UserError(
                f"shapes were timed at one depth ({self.depths[0]} layers): no per-layer / fixed "
                f"split to scale to {depth} layers; profile two depths (profile_layers)"
            )

    def _compute_vec(self, vec, depth: int) -> np.ndarray:
        lt, ft = self.layer_terms(vec), self.fixed_terms(vec)
        return np.array(
            [
                depth * lt["a1"],
                depth * lt["a2"] + ft["a2"],
                depth * lt["per_seq"] + ft["per_seq"],
                depth * lt["b"] + ft["b"],
            ]
        )

    def _se(self, fn) -> list:
        if self.loo is None or len(self.loo) < 2:
            return []
        vals = np.array([fn(v) for v in self.loo])
        n = len(vals)
        return list(np.sqrt((n - 1) / n * np.sum((vals - vals.mean(axis=0)) ** 2, axis=0)))

    def compute_at(self, depth: int) -> ComputeFit:
        self._check(depth)
        a1, a2, s, b = (float(x) for x in self._compute_vec(self.coef, depth))
        fit = ComputeFit(a1, a2, b, per_seq=s)
        se = self._se(lambda v: self._compute_vec(v, depth))
        if se:
            fit.stderr = dict(zip(("a1", "a2", "per_seq", "b"), (float(x) for x in se)))
        fit.rel_errors = list(self.rel_errors)
        return fit

    def comm_at(self, depth: int) -> dict:
        """{key: {"ms_per_token", "latency_ms", "extra_doc_ms" (key_docs), their stderr, "rel_errors"}} for
        a model of ``depth`` layers (every term is per layer: depth x the fitted value)."""
        self._check(depth)
        out = {}
        if self.comm_fixed is not None:
            for k, (c, errs) in self.comm_fixed.items():
                out[k] = {
                    "ms_per_token": depth * c,
                    "stderr": None,
                    "latency_ms": 0.0,
                    "latency_stderr": None,
                    "rel_errors": errs,
                }
            return out
        per_seq, latency, key_docs, _ = self.flags
        nk, base = len(self.keys), self._base()
        for j, k in enumerate(self.keys):
            idx = (
                [base + j]
                + ([base + nk + j] if latency else [])
                + ([base + (2 if latency else 1) * nk + j] if key_docs else [])
            )
            se = self._se(lambda v: depth * v[idx])
            vals = depth * self.coef[idx]
            rec = {
                "ms_per_token": float(vals[0]),
                "stderr": float(se[0]) if se else None,
                "latency_ms": float(vals[1]) if latency else 0.0,
                "latency_stderr": (float(se[1]) if se else None) if latency else None,
                "rel_errors": list(self.comm_rel_errors.get(k, [])),
            }
            if key_docs:
                i = 2 if latency else 1
                rec.update(extra_doc_ms=float(vals[i]), extra_doc_stderr=float(se[i]) if se else None)
            out[k] = rec
        return out


def fit_depth(
    compute_samples,
    comm_samples: dict,
    per_sequence: bool = True,
    group_latency: bool = True,
    key_docs: bool = False,
    joint: bool = True,
) -> DepthFit:
    """One NNLS (relative residuals, jackknife errors) over shapes timed on models of one or two
    depths. ``compute_samples``: [(lengths, ms, layers)] at degree 1; ``comm_samples``:
    {"mode:d": [(lengths, ms, layers)]}. With two depths the time of a degree-d group is

        n * ((a1' sum L^2 + a2' sum L) / d + s' docs + b') + a2_f sum L / d + s_f docs + b_f
          + n * (c'(m, d) sum L + lat'(m, d) + doc'(m, d) docs)

    (primes: per layer; _f: the fixed embedding / head / loss part, measured once per model), so the
    per-layer and fixed parts are told apart by the depth; one depth fits the combined terms
    (:func:`fit_joint`'s model). ``joint=False``: compute terms from degree 1 alone, then each key's
    per-token cost from its residual (:func:`fit_comm_per_token`) at the deepest depth."""
    compute_samples = [(list(L), float(ms), int(n)) for L, ms, n in compute_samples]
    _check_samples([(L, ms) for L, ms, _ in compute_samples])
    depths = sorted({n for *_, n in compute_samples} | {n for v in comm_samples.values() for *_, n in v})
    if len(depths) > 2:
        raise UserError(f"shapes at depths {depths}: at most two depths are fitted")
    two = len(depths) == 2
    if two and len({n for *_, n in compute_samples}) < 2:
        raise UserError(
            f"two depths {depths} need degree-1 shapes at both (got only "
            f"{sorted({n for *_, n in compute_samples})})"
        )
    keys = sorted(comm_samples) if joint else []
    samples = [(L, ms, 1, None, n) for L, ms, n in compute_samples]
    for k in keys:
        sp = int(k.split(":")[1])
        if sp < 2:
            raise UserError(f"communication is fitted for SP degrees >= 2, got {sp} in {k!r}")
        rows = [(list(L), float(ms), int(n)) for L, ms, n in comm_samples[k]]
        _check_samples([(L, ms) for L, ms, _ in rows] * 3)
        if group_latency and len({sum(L) for L, _, _ in rows}) < 2:
            raise UserError(
                f"{k!r}: a per-token cost and a group latency need shapes of at least 2 token "
                f"counts, got {sorted({sum(L) for L, _, _ in rows})}"
            )
        samples += [(L, ms, sp, k, n) for L, ms, n in rows]
    lat, kd = bool(group_latency and keys), bool(key_docs and keys)
    flags = (per_sequence, lat, kd, two)
    coef = _depth_coef(samples, keys, *flags)
    n = len(samples)
    loo = (
        np.array([_depth_coef(samples[:i] + samples[i + 1 :], keys, *flags) for i in range(n)])
        if n > 4
        else None
    )
    fit = DepthFit(depths=depths, keys=keys, coef=coef, loo=loo, flags=flags)
    A = _depth_rows(samples, keys, *flags)
    pred = A @ coef
    y = np.array([s[1] for s in samples])
    rel = (pred - y) / y
    fit.rel_errors = [float(e) for e, s in zip(rel, samples) if s[3] is None]
    for k in keys:
        fit.comm_rel_errors[k] = [float(e) for e, s in zip(rel, samples) if s[3] == k]
    if not joint and comm_samples:
        deep = depths[-1]
        comp = fit.compute_at(deep)
        fit.comm_fixed = {}
        for k, rows in sorted(comm_samples.items()):
            at = [(L, ms) for L, ms, m in rows if m == deep]
            c, errs = fit_comm_per_token(at, comp, int(k.split(":")[1]))
            fit.comm_fixed[k] = (c / deep, errs)
    return fit

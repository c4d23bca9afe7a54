"""Helpers shared by the GPU check's sections (benchmarks/gpu_sections.py, gpu_attention.py,
gpu_costfit.py): the section result file, a deadline, a timing loop, markdown tables, the
attention FLOP count and the long-tailed batch generator.

torch is imported inside the functions that need it, so the orchestrator (benchmarks/gpu_check.py)
can import this module without paying for torch.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SectionResult:
    """What a section reports; written to ``path`` (JSON, atomically) on every :meth:`flush`, so
    the orchestrator still has the rows measured so far when it kills the section at its budget."""

    path: Path
    """The JSON file the orchestrator reads after the section's process ended (or was killed)."""
    status: str = "running"
    """running | ok | FAIL: why (it ran, a check failed) | error: exception (it crashed)."""
    key: str = ""
    """One line of the key numbers, for the report's summary table."""
    lines: list = field(default_factory=list)
    """Markdown lines of the section's part of the report."""
    data: dict = field(default_factory=dict)
    """Machine-readable numbers (results.json); ``data["export"]`` is passed to later sections."""

    def flush(self) -> None:
        doc = {"status": self.status, "key": self.key, "lines": self.lines, "data": self.data}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))  # NaN stays NaN (Python's json reads it)
        os.replace(tmp, self.path)


def read_result(path: Path) -> dict | None:
    """The last flushed :class:`SectionResult` of a section as a dict (None: nothing written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Deadline:
    """Seconds left until a fixed point in time (monotonic clock)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Timing:
    """Seconds per call of a timed function: median, fastest, slowest over ``runs`` timed calls."""

    median: float
    """Median seconds per call."""
    low: float
    """Fastest call, seconds."""
    high: float
    """Slowest call, seconds."""
    runs: int
    """Timed calls (after the warm-up)."""

    @classmethod
    def nan(cls) -> "Timing":
        return cls(math.nan, math.nan, math.nan, 0)

    def spread_ms(self) -> str:
        """``median (low-high)`` in ms, for the report."""
        if self.runs == 0:
            return "-"
        if self.runs == 1:
            return f"{self.median * 1e3:.3f}"
        return f"{self.median * 1e3:.3f} ({self.low * 1e3:.3f}-{self.high * 1e3:.3f})"

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.low, "max_s": self.high, "runs": self.runs}


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, deadline: Deadline, warmup: int = 1, min_iters: int = 2, max_iters: int = 10,
          min_time_s: float = 0.3, quick: bool = False) -> Timing:
    """Time ``fn()`` after ``warmup`` calls: at least ``min_iters`` and at most ``max_iters`` timed
    calls, stopping once ``min_time_s`` is spent or the deadline is near. ``quick`` (CPU smoke): one
    warm-up and one timed call; the numbers mean nothing there, only the code path."""
    if quick:
        warmup, min_iters, max_iters = min(warmup, 1), 1, 1
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= min_iters and (spent >= min_time_s or deadline.left() < 5 * times[-1]):
            break
    return Timing(statistics.median(times), min(times), max(times), len(times))


def table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def causal_attn_flops(lengths, heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention over packed documents: QK^T and PV are 2 * L^2 * D
    multiply-adds each (2 FLOPs per multiply-add), half of the square is masked:
    ``2 * H * D * sum L^2``. Forward + backward is counted as 3.5x this (backward: 5 matmuls of the
    forward's 2, i.e. 2.5x)."""
    return 2.0 * heads * head_dim * sum(float(n) ** 2 for n in lengths)


FWD_BWD_FLOP_FACTOR = 3.5
"""fwd+bwd FLOPs of attention = 3.5 x the forward's (see :func:`causal_attn_flops`)."""


def long_tailed_lengths(total: int, rng, min_len: int) -> list[int]:
    """Document lengths summing to ``total``: Pareto(alpha=1.1)-distributed (a few long, many short),
    each at least ``min_len`` (``total >= min_len``), in shuffled order."""
    if total < min_len or min_len < 1:
        raise ValueError(f"need total >= min_len >= 1, got total={total}, min_len={min_len}")
    lengths, left = [], total
    while left > 0:
        n = int(min_len * (1 + rng.pareto(1.1)))
        n = min(max(n, min_len), left)
        if left - n < min_len:
            n = left
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    return lengths


def free_memory(device) -> None:
    import gc

    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

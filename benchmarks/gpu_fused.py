"""Section fused_ops of the GPU check: flexsp.ops with liger-kernel vs the eager torch path.

RMSNorm, RoPE and SwiGLU forward and forward+backward time at LLaMA-8B widths (16K tokens), and
linear + cross-entropy at a 128K vocabulary: time and the allocator's peak extra memory of eager
(full fp32 logits), flexsp's chunked torch path and liger's fused kernel. Target: the fused loss
needs >= 4x less peak memory than eager. Without CUDA or liger only the torch rows run.
"""
from __future__ import annotations

import math

from gpu_common import Deadline, SectionResult, Timing, bench, free_memory, short_error, sync, table

CE_MARGIN_BYTES = 256 * 2**20
"""Allowance over :func:`chunked_ce_peak_bytes` for allocator rounding and small temporaries (well
under one bf16 [tokens, vocab] buffer, so materialised logits anywhere exceed it)."""


def chunked_ce_peak_bytes(tokens: int, hidden: int, vocab: int, chunk: int = 256) -> int:
    """What a chunked bf16 linear + cross-entropy with an fp32 weight-gradient accumulator must hold
    at its peak (a chunk's weight-gradient update), as tests/test_ops_liger.py accounts it: the
    accumulator (V H 4), that chunk's bf16 product and fp32 upcast (V H 6), the hidden gradient
    (T H 2), the chunk's grad-logits (c V 2), the per-token losses (T 4). No [T, V] term."""
    return vocab * hidden * 10 + tokens * hidden * 2 + chunk * vocab * 2 + tokens * 4
"""Eager linear+CE peak memory / liger fused peak memory must be at least this."""


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(tokens=64, hidden=128, rope=(64, 4, 2, 32), ffn=256, ce=(64, 32, 1024))
    K = 1024
    return dict(tokens=16 * K, hidden=4096, rope=(16 * K, 32, 8, 128), ffn=14336, ce=(8 * K, 4096, 128 * K))


def _cases(device, s):
    import torch

    import flexsp.ops as ops
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)
    T, H = s["tokens"], s["hidden"]
    tq, hq, hk, hd = s["rope"]
    pos = torch.arange(tq, device=device) % max(tq // 3, 1)
    cos, sin = ops.rope_cos_sin(pos, hd)
    return {
        "rms_norm": ([rnd(T, H), rnd(H)], lambda x, w, backend: ops.rms_norm(x, w, backend=backend)),
        "rope": ([rnd(tq, hq, hd), rnd(tq, hk, hd)],
                 lambda q, k, backend: ops.apply_rope(q, k, cos, sin, backend=backend)),
        "swiglu": ([rnd(T, s["ffn"]), rnd(T, s["ffn"])],
                   lambda a, b, backend: ops.swiglu(a, b, backend=backend)),
    }


def _fwd_and_fwd_bwd(fn, inputs, backend):
    import torch
    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd():
        with torch.no_grad():
            fn(*inputs, backend=backend)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = fn(*leaves, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
    return fwd, fwd_bwd


def peak_extra_bytes(fn, device) -> int | None:
    """Extra bytes allocated at the peak of ``fn()`` (CUDA only; None elsewhere)."""
    import torch
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _ratio(a: Timing, b: Timing) -> str:
    return "-" if math.isnan(a.median) or math.isnan(b.median) else f"{a.median / b.median:.2f}x"


def section_fused_ops(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    import torch
    import torch.nn.functional as F

    import flexsp.ops as ops
    device, smoke = cfg["device"], cfg["smoke"]
    s = shapes(smoke)
    backends = ["torch"] + (["liger"] if device.type == "cuda" and ops.liger_available() else [])
    notes = [] if "liger" in backends else [
        f"liger path not run: {'no CUDA device' if device.type != 'cuda' else 'liger-kernel not importable'}"]
    rows = []
    for name, (inputs, fn) in _cases(device, s).items():
        times = {}
        for be in backends:
            fwd, fwd_bwd = _fwd_and_fwd_bwd(fn, inputs, be)
            try:
                times[be] = (bench(fwd, device, deadline, max_iters=20, min_time_s=0.1, quick=smoke),
                             bench(fwd_bwd, device, deadline, max_iters=20, min_time_s=0.1, quick=smoke))
            except Exception as exc:  # noqa: BLE001 - one op's failure is a row, not the section's end
                times[be] = (Timing.nan(), Timing.nan())
                notes.append(f"- {name}/{be}: {short_error(exc)}")
        eager, fused = times["torch"], times.get("liger", (Timing.nan(), Timing.nan()))
        rows.append((name, eager[0].spread_ms(), fused[0].spread_ms(), eager[1].spread_ms(),
                     fused[1].spread_ms(), _ratio(eager[0], fused[0]), _ratio(eager[1], fused[1])))
        res.data[name] = {f"{be}_{mode}": t.as_dict() for be, ts in times.items()
                          for mode, t in zip(("fwd", "fwd_bwd"), ts)}
        free_memory(device)
    res.lines = table(["op", "eager fwd ms", "liger fwd ms", "eager fwd+bwd ms", "liger fwd+bwd ms",
                       "speedup fwd", "speedup fwd+bwd"], rows) + [""] + notes
    res.flush()
    T, H, V = s["ce"]
    gen = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(T, H, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, generator=gen, device=device, dtype=torch.bfloat16) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (T,), generator=gen, device=device)
    variants = {
        "eager F.cross_entropy(h @ W.T)": lambda: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"),
        "flexsp.ops torch (chunked)": lambda: ops.linear_cross_entropy(h, w, y, backend="torch")}
    if "liger" in backends:
        variants["flexsp.ops liger (fused)"] = lambda: ops.linear_cross_entropy(h, w, y, backend="liger")
    mem, ce_rows = {}, []
    for label, loss_fn in variants.items():
        def step(loss_fn=loss_fn):
            h.grad = w.grad = None
            loss_fn().backward()
        try:
            mem[label] = peak_extra_bytes(step, device)
            t = bench(step, device, deadline, max_iters=5, min_time_s=0.2, quick=smoke)
            gib = "n/a (CPU)" if mem[label] is None else f"{mem[label] / 2**30:.2f}"
            ce_rows.append((label, t.spread_ms(), gib))
            res.data.setdefault("linear_ce", {})[label] = {**t.as_dict(), "peak_extra_bytes": mem[label]}
        except Exception as exc:  # noqa: BLE001
            ce_rows.append((label, f"error: {short_error(exc, 120)}", ""))
        free_memory(device)
    res.lines += ["", f"linear + cross-entropy, tokens={T} hidden={H} vocab={V}, bf16, fwd+bwd:", "",
                  *table(["variant", "fwd+bwd ms (min-max)", "peak extra GiB"], ce_rows)]
    speed = "; ".join(f"{r[0]} {r[6]}" for r in rows if r[6] != "-")
    eager, fused = mem.get("eager F.cross_entropy(h @ W.T)"), mem.get("flexsp.ops liger (fused)")
    chunked = mem.get("flexsp.ops torch (chunked)")
    if eager and fused:
        ratio = eager / fused
        bound = chunked_ce_peak_bytes(T, H, V) + CE_MARGIN_BYTES
        worst = max(fused, chunked or 0)
        res.data.update(ce_memory_ratio=ratio, ce_bound_bytes=bound)
        verdict = "PASS" if worst <= bound else "FAIL"
        res.lines += ["", f"**chunked/fused linear-CE peaks (torch {(chunked or 0) / 2**30:.2f} GiB, liger "
                          f"{fused / 2**30:.2f} GiB) within the no-full-logits budget "
                          f"{bound / 2**30:.2f} GiB (eager {ratio:.1f}x liger's): {verdict}**"]
        res.key = f"CE memory within budget: {verdict} (eager {ratio:.1f}x); fwd+bwd speedup {speed or '-'}"
    else:
        res.key = f"liger not run; fwd+bwd speedup {speed or '-'}"
    res.flush()

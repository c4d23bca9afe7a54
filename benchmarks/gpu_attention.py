"""Section attention of the GPU check: varlen causal attention TFLOP/s, forward and forward+backward,
as a share of the bf16 matmul peak measured by the env section.

Batches (priority order, the budget may cut the tail): single documents of 32K and 128K tokens,
long-tailed mixes of 32K and 128K, then 8K of each. Rows per batch:

- ``ours, dispatched``: ``flexsp.attention.local.varlen_attention(q, k, v, cu, causal=True)``, the path
  the model takes (the targets apply to it);
- SDPA's per-document loop under each SDPA backend torch has (FLASH_ATTENTION, CUDNN_ATTENTION,
  EFFICIENT_ATTENTION; ``torch.nn.attention.sdpa_kernel``), k/v pre-expanded to the query heads
  outside the timed region (the GQA copy is not timed);
- every ``flexsp.attention.local.BACKENDS`` name through ``varlen_attention(..., backend=name)``: a
  backend that raises gets an "unavailable: reason" row; ``math`` materialises [H, L, L] fp32 scores
  per document and is skipped above ``dense_limit_gib``;
- second pass, after every batch had the rows above: ``flex_attention`` called directly on our
  block-sparse BlockMask (``doc_block_mask``, built from cu_seqlens, never [T, T]), compiled through a
  wrapper function of its own (its own dynamo cache and recompile count: compiling
  ``flex_attention`` itself again would share the code object, and the recompile limit, with ours).
  Last because its compiles cost time the rows above need.

Memory: q/k/v, their gradients and the expanded k/v, nothing [T, T]. Rows are flushed as measured.
"""
from __future__ import annotations

import functools
import itertools
import math

from gpu_common import (FWD_BWD_FLOP_FACTOR, Deadline, SectionResult, Timing, bench, causal_attn_flops,
                        fmt_tokens, free_memory, long_tailed_lengths, short_error, table)

TARGET_FWD = 0.50
"""ours, documents >= 32K tokens: forward TFLOP/s >= this share of the measured bf16 peak."""
TARGET_FWD_BWD = 0.40
"""The same for forward+backward."""
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
FLOP_NOTE = ("FLOPs: causal forward = 2 * H * D * sum(L^2) (QK^T and PV, half the square); forward+backward "
             f"= {FWD_BWD_FLOP_FACTOR}x forward. H=query heads, D=head dim, L=document lengths.")


def attention_config(smoke: bool) -> dict:
    K = 1024
    if smoke:
        return dict(heads=(4, 2, 32), dtype="float32", min_doc=32, dense_limit_gib=1.0, min_left_s=0.5,
                    batches=[("longtail", 384)])
    return dict(heads=(32, 8, 128), dtype="bfloat16", min_doc=128, dense_limit_gib=4.0, min_left_s=6.0,
                batches=[("single", 32 * K), ("single", 128 * K), ("longtail", 32 * K), ("longtail", 128 * K),
                         ("single", 8 * K), ("longtail", 8 * K)])


def _heads_first(x):
    """``[T, H, D]`` -> ``[1, H, T, D]`` (a view)."""
    return x.transpose(0, 1)[None]


def _sdpa_loop(bounds, backend):
    """Per-document causal SDPA restricted to one SDPA backend; q ``[T,H,D]``, k/v expanded to H."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            outs = [F.scaled_dot_product_attention(_heads_first(q[s:e]), _heads_first(k[s:e]),
                                                   _heads_first(v[s:e]), is_causal=True)[0].transpose(0, 1)
                    for s, e in bounds]
        return torch.cat(outs)
    return run


def _implementations(lengths, cu, device, cfg):
    """[(label, fn or None, uses expanded kv, unavailable reason)] in measuring order."""
    from torch.nn.attention import SDPBackend

    from flexsp.attention import local as attn_local
    bounds = list(zip(cu[:-1], cu[1:]))
    heads = cfg["heads"][0]
    import torch
    chosen = attn_local.pick_backend(device, None, dtype=getattr(torch, cfg["dtype"]), head_dim=cfg["heads"][2],
                                     gqa=cfg["heads"][0] != cfg["heads"][1])
    out = [(f"ours, dispatched (-> {chosen})",
            lambda q, k, v: attn_local.varlen_attention(q, k, v, cu, causal=True), False, None)]
    for name in SDPA_BACKENDS:
        be = getattr(SDPBackend, name, None)
        reason = None if be is not None else f"torch has no SDPBackend.{name}"
        fn = _sdpa_loop(bounds, be) if be is not None else None
        out.append((f"SDPA per-doc loop [{name}]", fn, True, reason))
    dense_gib = heads * max(lengths) ** 2 * 4 / 2**30
    for name in attn_local.BACKENDS:
        label = f"varlen backend={name!r}"
        if name == "flex":
            label += " (flex_attention, compiled on CUDA, our block mask)"
        if name == "math" and dense_gib > cfg["dense_limit_gib"]:
            limit = cfg["dense_limit_gib"]
            out.append((label, None, False, f"skipped: materialises [H, L, L] fp32 scores, {dense_gib:.1f} "
                                            f"GiB for the longest document (limit {limit} GiB)"))
            continue
        out.append((label, lambda q, k, v, name=name: attn_local.varlen_attention(q, k, v, cu, causal=True,
                                                                                  backend=name), False, None))
    return out


@functools.lru_cache(None)
def _compiled_flex_baseline(compile_it: bool):
    """``flex_attention(q, k, v, block_mask, enable_gqa=True)`` in a function of its own, compiled on
    CUDA (a wrapper frame: dynamo caches its graphs on this code object, not on flex_attention's)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    def flex_baseline(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    return torch.compile(flex_baseline) if compile_it else flex_baseline


def _late_implementations(lengths, cu, device, cfg):
    """The second pass: flex_attention on our block mask (see the module docstring)."""
    from flexsp.attention.local import doc_block_mask
    label = "flex_attention direct (own compiled wrapper on CUDA, our block mask)"
    try:
        bm = doc_block_mask(tuple(cu), tuple(cu), True, device)
        flex = _compiled_flex_baseline(device.type == "cuda")
    except Exception as exc:  # noqa: BLE001
        return [(label, None, False, f"unavailable: {short_error(exc)}")]

    def run(q, k, v):
        return flex(_heads_first(q), _heads_first(k), _heads_first(v), bm)[0].transpose(0, 1)
    return [(label, run, False, None)]


def _measure(fn, args, mode, device, deadline, smoke) -> Timing:
    import torch
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*args)
    else:
        leaves = [a.detach().requires_grad_() for a in args]
        grad_out = torch.ones_like(args[0])

        def call():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad_out)
    return bench(call, device, deadline, warmup=1, min_iters=2, max_iters=8, min_time_s=0.25, quick=smoke)


def _best_sdpa(rows: list, desc: str) -> tuple[float, float] | None:
    """(fwd, fwd+bwd) % of peak of the best SDPA per-document loop measured on batch ``desc``."""
    def pct(rec, mode):
        x = rec.get(mode, {}).get("pct_peak")
        return x if x is not None and math.isfinite(x) else 0.0
    got = [(pct(r, "fwd"), pct(r, "fwd+bwd")) for r in rows
           if r["batch"] == desc and r["impl"].startswith("SDPA") and "fwd" in r]
    return (max(g[0] for g in got), max(g[1] for g in got)) if got else None


def _run_batch(desc, lengths, make_impls, acfg, cfg, rows, targets, res, deadline, render) -> None:
    """Every implementation of ``make_impls`` on one packed batch: a row each, flushed as measured."""
    import torch
    device, smoke, peak = cfg["device"], cfg["smoke"], cfg["ctx"].get("peak_tflops")
    H, HKV, D = acfg["heads"]
    total = sum(lengths)
    cu = [0, *itertools.accumulate(lengths)]
    try:
        torch.manual_seed(total)
        dt = getattr(torch, acfg["dtype"])
        q = torch.randn(total, H, D, device=device, dtype=dt)
        k = torch.randn(total, HKV, D, device=device, dtype=dt)
        v = torch.randn(total, HKV, D, device=device, dtype=dt)
        kx, vx = (x.repeat_interleave(H // HKV, dim=1) for x in (k, v))
        impls = make_impls(lengths, cu, device, acfg)
    except Exception as exc:  # noqa: BLE001
        rows.append((desc, make_impls.__name__.strip("_"), f"setup failed: {short_error(exc)}", "", "", ""))
        render()
        free_memory(device)
        return
    flops = causal_attn_flops(lengths, H, D)
    est = 0.0  # seconds a row is expected to take here, from the last measured one (compile excluded)
    for label, fn, expanded, reason in impls:
        if reason is None and deadline.left() < max(acfg["min_left_s"], est):
            reason = "not measured: section budget spent"
        if reason is not None:
            rows.append((desc, label, reason, "", "", ""))
            res.data["rows"].append({"batch": desc, "impl": label, "unavailable": reason})
            render()
            continue
        args = (q, kx, vx) if expanded else (q, k, v)
        rec, timings = {"batch": desc, "impl": label, "lengths": len(lengths)}, {}
        for mode in ("fwd", "fwd+bwd"):
            try:
                timings[mode] = _measure(fn, args, mode, device, deadline, smoke)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row
                timings[mode] = Timing.nan()
                rec[f"{mode}_error"] = short_error(exc)
                free_memory(device)
                if mode == "fwd":
                    break
        measured = [t.median for t in timings.values() if t.runs]
        if measured:  # a warm-up and ~3 timed calls per mode
            est = 4 * sum(measured) + 1.0
        if "fwd_error" in rec:
            rows.append((desc, label, f"unavailable: {rec['fwd_error']}", "", "", ""))
            rec["unavailable"] = rec["fwd_error"]
        else:
            factor = {"fwd": 1.0, "fwd+bwd": FWD_BWD_FLOP_FACTOR}
            tf = {m: flops * factor[m] / t.median / 1e12 if t.runs else math.nan for m, t in timings.items()}
            for m, t in timings.items():
                rec[m] = {**t.as_dict(), "tflops": tf[m], "pct_peak": 100 * tf[m] / peak if peak else None}
            fb = timings.get("fwd+bwd", Timing.nan())
            rows.append((desc, label, timings["fwd"].spread_ms(),
                         fb.spread_ms() if fb.runs else f"error: {rec.get('fwd+bwd_error', '-')}",
                         _pct(tf["fwd"], peak), _pct(tf.get("fwd+bwd", math.nan), peak)))
            if label.startswith("ours") and min(lengths) >= 32 * 1024 and peak:
                targets.append((desc, 100 * tf["fwd"] / peak, 100 * tf.get("fwd+bwd", math.nan) / peak))
        res.data["rows"].append(rec)
        print(f"[attention] {' | '.join(map(str, rows[-1]))}", flush=True)
        render()
    del q, k, v, kx, vx, impls
    free_memory(device)


def _pct(tflops: float, peak: float | None) -> str:
    if math.isnan(tflops):
        return "-"
    return f"{tflops:.1f}" + (f" ({100 * tflops / peak:.0f}%)" if peak else "")


def section_attention(cfg: dict, res: SectionResult, deadline: Deadline) -> None:
    import numpy as np
    acfg = attention_config(cfg["smoke"])
    H, HKV, D = acfg["heads"]
    peak = cfg["ctx"].get("peak_tflops")
    rng = np.random.default_rng(0)
    rows, notes, targets = [], [], []
    res.data.update(rows=[], heads=acfg["heads"], dtype=acfg["dtype"], peak_tflops=peak)
    batches = [(kind, total, [total] if kind == "single"
                else long_tailed_lengths(total, rng, acfg["min_doc"]))
               for kind, total in acfg["batches"]]
    descs = [f"{kind} {fmt_tokens(total)} ({len(lengths)} docs, max {max(lengths)})"
             for kind, total, lengths in batches]

    def render():  # rows grouped by batch (second-pass rows join their batch)
        res.lines = table(["batch", "implementation", "fwd ms median (min-max)",
                           "fwd+bwd ms median (min-max)", "fwd TFLOP/s (% peak)", "fwd+bwd TFLOP/s (% peak)"],
                          sorted(rows, key=lambda r: descs.index(r[0]) if r[0] in descs else len(descs)))
        res.lines += ["", *notes, "", f"% of the bf16 matmul peak measured by the env section "
                      f"({peak or float('nan'):.1f} TFLOP/s). {FLOP_NOTE} H={H}, kv heads={HKV}, D={D}, "
                      f"{acfg['dtype']}. Ours and the varlen backends take k/v with {HKV} heads (GQA in the "
                      f"kernel); the SDPA loops get k/v expanded to {H} heads outside the timed region."]
        key = []
        for desc, pf, pfb in targets:
            ok = pf >= TARGET_FWD * 100 and pfb >= TARGET_FWD_BWD * 100
            sdpa = _best_sdpa(res.data["rows"], desc)
            vs = f" (best SDPA loop {sdpa[0]:.0f}% / {sdpa[1]:.0f}%)" if sdpa else ""
            res.lines.append(f"**target ours @ {desc}: fwd {pf:.0f}% (>= {TARGET_FWD:.0%}), fwd+bwd "
                             f"{pfb:.0f}% (>= {TARGET_FWD_BWD:.0%}): {'PASS' if ok else 'FAIL'}**{vs}")
            key.append(f"{desc.split(' (')[0]}: fwd {pf:.0f}% / fwd+bwd {pfb:.0f}%{vs}")
        res.key = ("ours (% of peak) " + "; ".join(key)) if key else "ours: no row >= 32K tokens measured"
        res.flush()

    for make_impls in (_implementations, _late_implementations):
        for (kind, total, lengths), desc in zip(batches, descs):
            if deadline.left() < acfg["min_left_s"]:
                notes.append(f"- {desc} / {make_impls.__name__.strip('_')}: not measured, budget spent")
                render()
                continue
            _run_batch(desc, lengths, make_impls, acfg, cfg, rows, targets, res, deadline, render)
    try:
        from torch._dynamo.utils import counters
        res.data["dynamo_counters"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames")}
        notes.append(f"- dynamo counters (this process): {res.data['dynamo_counters']}")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"- dynamo counters unavailable: {short_error(exc)}")
    render()

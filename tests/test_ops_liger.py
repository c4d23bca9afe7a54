"""Equivalence of flexsp.ops' liger-kernel (Triton) path with its pure PyTorch path.

Where each check runs:

* CPU, in CI: under Triton's interpreter (``TRITON_INTERPRET=1``) in ONE subprocess per pytest
  session (the module fixture ``interpreter_results``). The variable must be set before triton
  is imported and is read by triton at import, so it cannot be toggled inside this pytest
  process; setting it only in the child's environment keeps it from leaking into any other
  test. Small shapes, fwd + bwd against the torch path: RoPE, SwiGLU, RMSNorm, fused linear +
  cross-entropy (float32, sum and mean), and the weight-gradient accumulation check (bf16).
  Needs the test extra's ``triton==3.7.1`` + ``liger-kernel==0.8.0`` (skipped without them).
  Interpreter limits met and how they are handled:
  - RMSNorm: liger's kernel calls ``triton.language.extra.libdevice.rsqrt``, a stub whose body
    is ``...``: compiled kernels bind it to CUDA's libdevice, but the interpreter only patches
    ``triton.language`` / ``tl.math`` builtins, so the stub returns None and
    ``tl.store(rstd_base, rstd)`` fails ("cannot convert None ... to tensor"). The child binds
    liger's module-level ``rsqrt`` to ``tl.math.rsqrt`` (the same function, which the
    interpreter implements) -- only there; everything else in the kernel is liger's. The GPU
    tests run the real libdevice call.
  - fused linear + cross-entropy and RMSNorm with triton < 3.7 (the GPU image's 3.6, say): the
    interpreter converts a runtime integer kernel argument used as a ``range()`` bound (liger's
    ``for i in range(0, n_cols, BLOCK_SIZE)`` in cross-entropy, ``range(row_start, row_end)``
    in RMSNorm's backward) with ``int()`` of a shape-(1,) NumPy array, which NumPy 2.4 rejects
    ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.7 squeezes the
    array first. Those checks are skipped, with that reason, only on such a combination.
* GPU-only (``@pytest.mark.gpu``, skipped without CUDA): every op in bfloat16 (the training dtype)
  and at realistic sizes; RoPE compiling once per token-count class, not once per token count;
  the default linear + cross-entropy path making no host sync; and the fused losses' peak
  memory against a byte accounting of what they must hold (no full logits).

Tolerances: float32 rtol=atol=1e-4 -- Triton kernels fuse and reorder float32 math (online
logsumexp over vocab blocks, fused silu) and the interpreter emulates it with numpy, so the two
paths differ by rounding of order 1e-6..1e-5 relative. bfloat16: rtol=5e-2 and atol of 5e-2
times the reference's max magnitude -- the two paths round to bf16 at different points (liger
stores the grad-logits and each chunk's weight-gradient product in bf16, with its own chunk
size; the torch path rounds its softmax gradient), each bf16 rounding being 2**-8 relative, and
a gradient element sums thousands of such rounded terms.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # when run as a script in the interpreter subprocess
    sys.path.insert(0, str(REPO_ROOT))

import flexsp.ops as ops  # noqa: E402

# Checked without importing triton here (the import is left to the interpreter subprocess).
HAS_LIGER_PKGS = all(importlib.util.find_spec(m) is not None for m in ("triton", "liger_kernel"))
HAS_CUDA = torch.cuda.is_available()

needs_liger_pkgs = pytest.mark.skipif(
    not HAS_LIGER_PKGS, reason="triton/liger-kernel not installed (the test extra installs them)"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_liger_cuda = pytest.mark.skipif(
    not (HAS_CUDA and ops.liger_available()), reason="needs a CUDA device and liger-kernel"
)


def _close(actual, expected, dtype, what):
    actual, expected = actual.float(), expected.float()
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        tol = dict(rtol=5e-2, atol=5e-2 * max(expected.abs().max().item(), 1e-3))
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _run_both(fn, inputs, grad_out=None):
    """Run fn(*inputs, backend=b) for both backends; return {b: (outputs, input grads)}."""
    results = {}
    for backend in ("torch", "liger"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        gens = grad_out if grad_out is not None else [torch.ones_like(o) for o in outs]
        torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(gens, outs)])
        results[backend] = ([o.detach() for o in outs], [t.grad for t in leaves if t.is_floating_point()])
    return results


def _compare(results, dtype, name):
    (o_t, g_t), (o_l, g_l) = results["torch"], results["liger"]
    for i, (a, b) in enumerate(zip(o_l, o_t)):
        assert a.dtype == b.dtype, f"{name} output {i}: liger dtype {a.dtype} vs torch {b.dtype}"
        _close(a, b, dtype, f"{name} output {i}")
    for i, (a, b) in enumerate(zip(g_l, g_t)):
        _close(a, b, dtype, f"{name} grad {i}")


def _autograd_node(tensor, name_part):
    """The first node named like ``name_part`` in ``tensor``'s backward graph (breadth-first)."""
    queue, seen = [tensor.grad_fn], set()
    while queue:
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        if name_part in type(node).__name__:
            return node
        queue.extend(fn for fn, _ in node.next_functions)
    raise AssertionError(f"no {name_part} node in the autograd graph of the output")


# ------------------------------------------------------------------ checks (shared by CPU and GPU)


def check_rope(device, dtype, tokens=40, hq=4, hk=2, d=32):
    gen = torch.Generator().manual_seed(0)
    doc_lens = [tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4]
    pos = torch.cat([torch.arange(n) for n in doc_lens]).to(device)
    cos, sin = ops.rope_cos_sin(pos, d, dtype=torch.float32)
    q = torch.randn(tokens, hq, d, generator=gen).to(device, dtype)
    k = torch.randn(tokens, hk, d, generator=gen).to(device, dtype)
    gq = torch.randn(tokens, hq, d, generator=gen).to(device)
    gk = torch.randn(tokens, hk, d, generator=gen).to(device)
    results = _run_both(
        lambda q, k, backend: ops.apply_rope(q, k, cos, sin, backend=backend), [q, k], [gq, gk]
    )
    _compare(results, dtype, "rope")

    # The tables reach liger with batch 1 (its cos_bs constexpr stays 1 for every token count) ...
    from liger_kernel.ops.rope import LigerRopeFunction

    q_out, _ = ops.apply_rope(q.clone().requires_grad_(), k, cos, sin, backend="liger")
    saved_cos, saved_sin = _autograd_node(q_out, "LigerRopeFunction").saved_tensors
    assert saved_cos.shape == (1, tokens, d) and saved_sin.shape == (1, tokens, d), saved_cos.shape
    # ... and give bitwise the result of the 2-D [tokens, d] form liger also accepts.
    q4 = q.clone().unsqueeze(0).transpose(1, 2)
    k4 = k.clone().unsqueeze(0).transpose(1, 2)
    by_2d = LigerRopeFunction.apply(q4.clone(), k4.clone(), cos, sin)
    by_3d = LigerRopeFunction.apply(q4.clone(), k4.clone(), cos[None], sin[None])
    assert all(torch.equal(a, b) for a, b in zip(by_2d, by_3d)), "cos [1, T, d] vs [T, d] differ"


def check_swiglu(device, dtype, rows=24, cols=96):
    gen = torch.Generator().manual_seed(1)
    a = (2 * torch.randn(rows, cols, generator=gen)).to(device, dtype)
    b = torch.randn(rows, cols, generator=gen).to(device, dtype)
    g = torch.randn(rows, cols, generator=gen).to(device)
    _compare(_run_both(ops.swiglu, [a, b], [g]), dtype, "swiglu")


def check_rms_norm(device, dtype, rows=33, cols=128):
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(rows, cols, generator=gen)).to(device, dtype)
    w = torch.randn(cols, generator=gen).to(device, dtype)
    g = torch.randn(rows, cols, generator=gen).to(device)
    _compare(
        _run_both(lambda x, w, backend: ops.rms_norm(x, w, 1e-6, backend=backend), [x, w], [g]),
        dtype,
        "rms_norm",
    )


def check_linear_ce(device, dtype, tokens=48, hidden=32, vocab=300):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    y[::7] = -100
    y = y.to(device)
    for reduction in ("sum", "mean"):
        results = _run_both(
            lambda h, w, backend: ops.linear_cross_entropy(h, w, y, reduction=reduction, backend=backend),
            [h, w],
            [torch.tensor(2.0, device=device)],
        )
        _compare(results, dtype, f"linear_ce[{reduction}]")


def check_linear_ce_weight_grad_accumulation(device, tokens=256, hidden=4, vocab=512):
    """bf16 LM-head weight gradient: accumulated in float32 it is about as accurate as the hidden
    gradient; liger's default bf16 accumulation is measurably worse.

    Both gradients multiply the same bf16 grad-logits (``gh = G @ W`` reduces over the vocab in
    one matmul, ``gw = G.T @ h`` over tokens, chunk by chunk), so with a float32 accumulator they
    carry the same roundings plus one bf16 rounding of each chunk's product: measured on CPU
    (interpreter, 4 seeds) ``err(gw) / err(gh)`` = 1.29-1.32. In a bf16 accumulator each of the
    128 chunk additions (liger makes ``vocab / hidden`` = 128 chunks of 2 tokens here) rounds the
    running sum, and small terms added to a large row are lost below half an ulp, so the error
    grows with the square root of the chunk count: measured 3.4-4.3. The bar, 2, sits between,
    and the second assertion shows the check can tell the two apart. A tiny hidden size keeps the
    chunk count high at few tokens (the interpreter's cost is per token). Errors are relative
    Frobenius norms against float64 on the same bf16 inputs.
    """
    import torch.nn.functional as F
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    y[::7] = -100
    y = y.to(device)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), y, reduction="sum").backward()

    def errors(loss_fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss_fn(hh, ww).backward()
        pairs = ((ww.grad, w64.grad), (hh.grad, h64.grad))
        return [((g.double() - ref).norm() / ref.norm()).item() for g, ref in pairs]

    ours_w, ours_h = errors(lambda hh, ww: ops.linear_cross_entropy(hh, ww, y, backend="liger"))
    assert ours_w <= 2 * ours_h, f"weight grad rel. error {ours_w:.2e} > 2 x hidden grad's {ours_h:.2e}"
    # liger's default accum_dtype=None (bf16), called directly: the same bar fails
    bf16_w, bf16_h = errors(
        lambda hh, ww: LigerFusedLinearCrossEntropyFunction.apply(
            hh, ww, y, None, None, -100, 0.0, 0.0, "sum"
        )[0]
    )
    assert bf16_w > 2 * bf16_h, f"bf16 accumulation {bf16_w:.2e} vs {bf16_h:.2e}: check cannot tell"


INTERPRETER_CHECKS = {
    "rope": lambda dev: check_rope(dev, torch.float32),
    "swiglu": lambda dev: check_swiglu(dev, torch.float32),
    "rms_norm": lambda dev: check_rms_norm(dev, torch.float32),
    "linear_ce": lambda dev: check_linear_ce(dev, torch.float32),
    "linear_ce_weight_grad_accumulation": check_linear_ce_weight_grad_accumulation,
}
GPU_CHECKS = {
    "rope": check_rope,
    "swiglu": check_swiglu,
    "rms_norm": check_rms_norm,
    "linear_ce": check_linear_ce,
}


# ------------------------------------------------------------------ CPU: Triton interpreter


# Checks whose liger kernels loop over a runtime integer kernel argument, and where.
RUNTIME_RANGE_BOUNDS = {
    "rms_norm": "RMSNorm backward's range(row_start, row_end)",
    "linear_ce": "cross-entropy's range(0, n_cols, BLOCK_SIZE)",
    "linear_ce_weight_grad_accumulation": "cross-entropy's range(0, n_cols, BLOCK_SIZE)",
}


def interpreter_skip_reason(name: str) -> str | None:
    """Why the interpreter cannot run check ``name`` with the installed triton, or None."""
    if name not in RUNTIME_RANGE_BOUNDS:
        return None
    import numpy as np

    triton_version = importlib.metadata.version("triton")
    try:
        int(np.ones(1))
        numpy_rejects = False
    except TypeError:
        numpy_rejects = True
    if tuple(int(p) for p in triton_version.split(".")[:2]) < (3, 7) and numpy_rejects:
        return (
            f"triton {triton_version}'s interpreter takes int() of a shape-(1,) array for liger's "
            f"{RUNTIME_RANGE_BOUNDS[name]}, which NumPy {np.__version__} rejects; fixed in triton 3.7"
        )
    return None


@pytest.fixture(scope="module")
def interpreter_results():
    """Run every runnable interpreter check once, in one subprocess; {name: result dict}."""
    names = [n for n in INTERPRETER_CHECKS if interpreter_skip_reason(n) is None]
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.pop(ops.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, __file__, *names], env=env, capture_output=True, text=True, timeout=300
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["check"]] = record
    missing = {
        n: dict(ok=False, error=f"no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        for n in names
        if n not in results
    }
    return {**results, **missing}


@needs_liger_pkgs
@pytest.mark.parametrize("name", sorted(INTERPRETER_CHECKS))
def test_liger_matches_torch_under_triton_interpreter(name, interpreter_results):
    reason = interpreter_skip_reason(name)
    if reason:
        pytest.skip(reason)
    result = interpreter_results[name]
    assert result["ok"], f"{name} under TRITON_INTERPRET=1:\n{result['error']}"


def test_triton_interpret_does_not_leak_into_this_process():
    # the interpreter runs in a child process only; this one (and every other test) compiles
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0")


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_liger_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(GPU_CHECKS))
def test_liger_matches_torch_on_cuda(name, dtype):
    device = torch.device("cuda")
    GPU_CHECKS[name](device, dtype)
    # a realistic size too (many rows, wide hidden)
    big = {
        "rope": dict(tokens=4096, hq=32, hk=8, d=128),
        "swiglu": dict(rows=4096, cols=14336),
        "rms_norm": dict(rows=4096, cols=4096),
        "linear_ce": dict(tokens=1024, hidden=1024, vocab=32000),
    }[name]
    GPU_CHECKS[name](device, dtype, **big)


@pytest.mark.gpu
@needs_liger_cuda
def test_liger_weight_grad_accumulates_in_fp32_on_cuda():
    check_linear_ce_weight_grad_accumulation(torch.device("cuda"))


@pytest.mark.gpu
@needs_liger_cuda
def test_liger_rope_compiles_per_token_count_class_not_per_token_count():
    """Five local token counts, none a multiple of 16: one forward + one backward specialisation.

    Triton specialises integer arguments only on ``== 1`` and divisibility by 16, so the token
    count (``seq_len``) alone adds no kernel; with 2-D cos/sin liger's ``cos_bs`` constexpr would
    be the token count and this would compile 10 kernels. Counts entries of the kernel cache
    (``JITFunction.device_caches[device][0]``, triton 3.6 - 3.7).
    """
    from liger_kernel.ops.rope import _triton_rope

    def compiled():
        return sum(len(cache[0]) for cache in _triton_rope.device_caches.values())

    device, d = torch.device("cuda"), 128
    before = compiled()
    for tokens in (37, 101, 250, 333, 517):
        cos, sin = ops.rope_cos_sin(torch.arange(tokens, device=device), d, dtype=torch.bfloat16)
        q = torch.randn(tokens, 8, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(tokens, 2, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        q_out, k_out = ops.apply_rope(q, k, cos, sin, backend="liger")
        (q_out.float().sum() + k_out.float().sum()).backward()
    torch.cuda.synchronize()
    assert compiled() - before <= 2, f"{compiled() - before} new RoPE kernels for 5 token counts"


@pytest.mark.gpu
@needs_liger_cuda
def test_default_linear_ce_makes_no_host_sync_on_cuda():
    device = torch.device("cuda")
    h = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 1024, device=device, dtype=torch.bfloat16) / 32).requires_grad_()
    y = torch.randint(0, 32000, (1024,), device=device)
    for reduction in ("sum", "mean"):
        ops.linear_cross_entropy(h, w, y, reduction=reduction).backward()  # warm-up (cuBLAS init)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.linear_cross_entropy(h, w, y, reduction=reduction).backward()  # auto -> torch path
            # why auto does not pick liger: its 0.8.0 fused loss syncs (.item() in forward)
            with pytest.raises(RuntimeError, match="synchroniz"):
                ops.linear_cross_entropy(h, w, y, reduction=reduction, backend="liger").backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def fused_ce_peak_bytes(tokens: int, hidden: int, vocab: int, chunk: int) -> int:
    """Bytes a chunked bf16 linear + cross-entropy with a float32 weight-gradient accumulator
    must hold at its peak (both our torch path and liger 0.8.0's; the moment is a chunk's
    weight-gradient update, ``acc += (G_chunk.T @ h_chunk).float()``). No [tokens, vocab] term."""
    accumulator = vocab * hidden * 4  # float32 weight-gradient accumulator
    product = vocab * hidden * (2 + 4)  # that chunk's bf16 product and its float32 upcast
    grad_hidden = tokens * hidden * 2  # bf16 hidden gradient (becomes h.grad)
    grad_logits = chunk * vocab * 2  # the chunk's bf16 grad-logits
    losses = tokens * 4  # float32 per-token losses
    return accumulator + product + grad_hidden + grad_logits + losses


@pytest.mark.gpu
@needs_liger_cuda
def test_fused_linear_ce_never_materialises_full_logits_at_128k_vocab():
    """Peak memory of eager vs the two chunked losses, each against what it must allocate.

    tokens=8192, hidden=4096, vocab=131072, bf16. Eager ``F.cross_entropy((h @ W.T).float())``
    holds three float32 [tokens, vocab] buffers in log-softmax's backward (its saved output, the
    incoming gradient and the result: 3 x 4 GiB; measured 12.00 GiB on an H200); we require at
    least two, which shows the measurement sees full logits when they exist. The chunked losses
    must fit :func:`fused_ce_peak_bytes` (5.13 GiB here) plus a margin of 256 MiB for allocator
    rounding and small temporaries -- well under one bf16 [tokens, vocab] buffer (2 GiB), so
    materialising the logits anywhere fails the test. Chunk sizes: the torch path's default
    (``2**25 // vocab`` = 256 tokens) and liger 0.8.0's ``next_pow2(ceil(tokens / ceil(vocab /
    hidden)))`` = 256. Base allocations (h, W, labels) are excluded; h.grad/W.grad count.
    """
    import torch.nn.functional as F
    import triton

    from flexsp.ops import torch_ops

    device = torch.device("cuda")
    tokens, hidden, vocab = 8192, 4096, 131072
    h = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=device)

    def peak_extra(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    full_fp32_logits = tokens * vocab * 4
    margin = 256 * 2**20
    assert margin < tokens * vocab * 2  # smaller than one bf16 copy of the logits
    eager = peak_extra(lambda: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))
    assert eager >= 2 * full_fp32_logits, f"eager peak {eager / 2**30:.2f} GiB: measurement misses logits"
    liger_chunk = triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, hidden)))
    for backend, chunk in (("torch", torch_ops.default_chunk_size(tokens, vocab)), ("liger", liger_chunk)):
        used = peak_extra(lambda: ops.linear_cross_entropy(h, w, y, reduction="sum", backend=backend))
        bound = fused_ce_peak_bytes(tokens, hidden, vocab, chunk) + margin
        assert used <= bound, (
            f"{backend}: peak {used / 2**30:.2f} GiB > accounted {bound / 2**30:.2f} GiB "
            f"(eager {eager / 2**30:.2f} GiB)"
        )


if __name__ == "__main__":  # the interpreter subprocess: python tests/test_ops_liger.py NAME...
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    import liger_kernel.ops.rms_norm as liger_rms_norm
    import triton.language as tl

    # libdevice.rsqrt is a stub the interpreter cannot run (see the module docstring); bind liger's
    # RMSNorm to tl.math.rsqrt, looked up at call time so the interpreter's patched version is used
    liger_rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)
    for check in sys.argv[1:]:
        start = time.perf_counter()
        try:
            INTERPRETER_CHECKS[check](torch.device("cpu"))
            record = dict(check=check, ok=True, error="")
        except Exception as exc:  # reported per check to the parent test
            import traceback

            record = dict(check=check, ok=False, error="".join(traceback.format_exception(exc))[-3000:])
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(record), flush=True)

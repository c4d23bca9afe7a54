"""Equivalence of flexsp.ops' liger-kernel (Triton) path with its pure PyTorch path.

Where each check runs:

* On CPU, under Triton's interpreter (``TRITON_INTERPRET=1``), in a subprocess -- the variable
  must be set before triton and liger's kernels are imported, so it cannot be toggled inside
  this pytest process. Small float32 shapes, a few seconds in all. Covered this way: RoPE,
  SwiGLU, fused linear + cross-entropy (fwd and bwd). Skipped when liger-kernel/triton are not
  installed (they are the optional ``gpu`` extra; measured with liger-kernel 0.8.0 +
  triton 3.9.0 on torch 2.13 CPU).
* GPU-only (``@pytest.mark.gpu``, skipped without CUDA):
  - RMSNorm: liger's kernel calls ``libdevice.rsqrt``, which the interpreter does not implement
    (the kernel stores None and fails), so it cannot run on CPU.
  - every op in bfloat16 (the training dtype) and at realistic sizes;
  - the memory claim: fused linear + cross-entropy at a 128K vocabulary peaks at least 4x lower
    than eager ``F.cross_entropy(hidden @ weight.T)``.

Other liger versions seen under the interpreter: 0.8.5 fails RMSNorm and SwiGLU
(``eps.to(...)`` on a Python float scalar); with triton 3.6's interpreter the fused
cross-entropy fails too. The GPU machine's image has triton 3.6, where compiled kernels are
unaffected.

Tolerances: float32 rtol=atol=1e-4 -- Triton kernels fuse and reorder float32 math (online
logsumexp over vocab blocks, fused silu) and the interpreter emulates it with numpy, so the two
paths differ by rounding of order 1e-6..1e-5 relative. bfloat16: rtol=5e-2 and atol of 5e-2
times the reference's max magnitude -- liger accumulates the weight gradient of the fused loss
in bf16 across chunks (its default), and each bf16 rounding is 2**-8 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # when run as a script in the interpreter subprocess
    sys.path.insert(0, str(REPO_ROOT))

import flexsp.ops as ops  # noqa: E402

HAS_LIGER = ops.liger_available()
HAS_CUDA = torch.cuda.is_available()

needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel/triton not installed (optional gpu extra)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


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
        _close(a, b, dtype, f"{name} output {i}")
    for i, (a, b) in enumerate(zip(g_l, g_t)):
        _close(a, b, dtype, f"{name} grad {i}")


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
    results = _run_both(lambda q, k, backend: ops.apply_rope(q, k, cos, sin, backend=backend), [q, k], [gq, gk])
    _compare(results, dtype, "rope")


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
    _compare(_run_both(lambda x, w, backend: ops.rms_norm(x, w, 1e-6, backend=backend), [x, w], [g]), dtype, "rms_norm")


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


INTERPRETER_CHECKS = {"rope": check_rope, "swiglu": check_swiglu, "linear_ce": check_linear_ce}
GPU_CHECKS = {**INTERPRETER_CHECKS, "rms_norm": check_rms_norm}


# ------------------------------------------------------------------ CPU: Triton interpreter


@needs_liger
def test_liger_matches_torch_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop(ops.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, __file__, *INTERPRETER_CHECKS], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    for name in INTERPRETER_CHECKS:
        assert f"ok {name}" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_cuda
@needs_liger
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
@needs_cuda
@needs_liger
def test_fused_linear_ce_peak_memory_4x_lower_than_eager_at_128k_vocab():
    import torch.nn.functional as F

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

    eager = peak_extra(lambda: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))
    fused = peak_extra(lambda: ops.linear_cross_entropy(h, w, y, reduction="sum", backend="liger"))
    lean_torch = peak_extra(lambda: ops.linear_cross_entropy(h, w, y, reduction="sum", backend="torch"))
    assert eager >= 4 * fused, f"eager {eager / 2**30:.2f} GiB vs fused {fused / 2**30:.2f} GiB"
    assert eager >= 2 * lean_torch, f"eager {eager / 2**30:.2f} GiB vs chunked torch {lean_torch / 2**30:.2f} GiB"


if __name__ == "__main__":  # the interpreter subprocess: python tests/test_ops_liger.py NAME...
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    for check in sys.argv[1:]:
        INTERPRETER_CHECKS[check](torch.device("cpu"), torch.float32)
        print(f"ok {check}", flush=True)

"""FlashAttention varlen kernels with log-sum-exp, for CUDA: two providers of one API.

* ``aten_flash``: the FlashAttention-2 varlen kernels compiled into PyTorch itself
  (``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward``, the kernels
  behind ``torch.nn.attention.varlen.varlen_attn``). No extra package; fp16/bf16, head dim a
  multiple of 8 up to 256, GPUs of compute capability 8.0+. Whether they run on this build and
  device is probed once per (device, dtype, head dim, GQA) with a tiny forward + backward
  (:func:`aten_flash_usable`); a probe that fails is reported once (a warning naming the reason)
  and the caller picks the next backend.
* ``flash``: the ``flash_attn`` package's varlen kernels, when installed (called by parameter
  name, so the private signatures of flash_attn 2.4+ all work).

Both: ``forward(q, k, v, cu_q, cu_k, causal, scale, window)`` -> ``(out [Tq,H,D], lse [H,Tq])``
and ``backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window)`` -> ``(dq, dk, dv)``
against a possibly *merged* ``out``/``lse`` (ring attention). GQA is native (``Hkv | H``); the
causal diagonal is aligned bottom-right. Rows that see no key: out 0, lse ``-inf`` (FlashAttention
writes ``+inf`` there; translated both ways). ``window`` = w: query ``i`` sees keys
``i - w < j <= i`` (``window_size_left = w - 1``). Boundaries come as host ints and are copied
to the device once per micro-batch from pinned memory (:func:`device_cu`), never synchronously.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from flexsp.hostcopy import to_device


def bounds(cu) -> list[tuple[int, int]]:
    cu = cu.tolist() if torch.is_tensor(cu) else list(cu)
    return list(zip(cu[:-1], cu[1:]))


def max_len(cu) -> int:
    return max((e - s for s, e in bounds(cu)), default=0)


@functools.lru_cache(maxsize=64)
def _device_cu(cu: tuple, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(cu, dtype=torch.int32), device)


def device_cu(cu, device) -> torch.Tensor:
    """int32 boundaries on ``device``: copied once per distinct boundaries (cached, so every layer
    and ring step of a micro-batch reuses the copy) from pinned memory, without a host sync."""
    return _device_cu(tuple(int(c) for c in (cu.tolist() if torch.is_tensor(cu) else cu)), device)


def _window_sizes(causal: bool, window: int | None) -> tuple[int, int]:
    if window:
        return window - 1, 0
    return -1, (0 if causal else -1)


def _lse_from_flash(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isposinf(lse), float("-inf"))


def _lse_to_flash(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()


def _check_lse(lse: torch.Tensor, q: torch.Tensor, who: str) -> None:
    want = (q.shape[1], q.shape[0])
    if tuple(lse.shape) != want or lse.dtype != torch.float32:
        raise RuntimeError(
            f"{who} returned a {tuple(lse.shape)} {lse.dtype} LSE, expected the unpadded "
            f"[H, Tq] = {list(want)} float32 of FlashAttention >= 2.4"
        )


# ---------------------------------------------------------------- torch's built-in kernels
def aten_forward(q, k, v, cu_q, cu_k, causal, scale, window=None):
    left, right = _window_sizes(causal, window)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        device_cu(cu_q, q.device),
        device_cu(cu_k, q.device),
        max_len(cu_q),
        max_len(cu_k),
        0.0,
        bool(causal),
        False,
        scale=scale,
        window_size_left=left,
        window_size_right=right,
    )
    _check_lse(lse, q, "aten._flash_attention_forward")
    return out, _lse_from_flash(lse)


def _rng_placeholders(device):
    # dropout is 0: the kernels never read the RNG state, but the schema wants two tensors
    z = torch.zeros(2, dtype=torch.int64, device=device)
    return z, z


def aten_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window=None):
    left, right = _window_sizes(causal, window)
    seed, offset = _rng_placeholders(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        _lse_to_flash(lse),
        device_cu(cu_q, q.device),
        device_cu(cu_k, q.device),
        max_len(cu_q),
        max_len(cu_k),
        0.0,
        bool(causal),
        seed,
        offset,
        scale=scale,
        window_size_left=left,
        window_size_right=right,
    )
    return dq, dk, dv


def aten_flash_shape_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Why torch's flash kernels cannot take these inputs ('' = they can, pending the probe)."""
    if device.type != "cuda":
        return f"device {device.type} is not CUDA"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no aten._flash_attention_forward"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (flash needs float16 or bfloat16)"
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} (flash needs a multiple of 8, at most 256)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} < 8.0"
    return ""


@functools.lru_cache(None)
def aten_flash_usable(device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    """Shape check plus a one-time probe (2 documents, forward + backward, finite results) of
    torch's flash kernels for this key. A failure warns once with the reason and returns False."""
    reason = aten_flash_shape_ok(device, dtype, head_dim)
    if not reason:
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            hq, hk = (4, 2) if gqa else (2, 2)
            q = torch.randn(8, hq, head_dim, generator=g).to(device, dtype)
            k, v = (torch.randn(8, hk, head_dim, generator=g).to(device, dtype) for _ in range(2))
            cu = (0, 3, 8)
            out, lse = aten_forward(q, k, v, cu, cu, True, head_dim**-0.5)
            grads = aten_backward(torch.ones_like(out), q, k, v, out, lse, cu, cu, True, head_dim**-0.5)
            if not all(bool(torch.isfinite(t).all()) for t in (out, lse, *grads)):
                reason = "the probe returned non-finite values"
        except Exception as exc:  # noqa: BLE001 -- any failure means: not usable here, say why
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if reason:
        if device.type == "cuda":
            warnings.warn(
                f"flexsp attention: torch's built-in flash kernels cannot run {dtype} head dim "
                f"{head_dim} on {device} ({reason}); using the next backend",
                stacklevel=3,
            )
        return False
    return True


# ---------------------------------------------------------------- the flash_attn package
@functools.lru_cache(None)
def have_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except Exception:
        return False


# Values for flash_attn parameters that some versions require and we do not use (no sliding
# window, softcap, ALiBi, dropout RNG state). Passed only where a version has no default.
_FLASH_FILL = {
    "window_size": (-1, -1),
    "window_size_left": -1,
    "window_size_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "deterministic": False,
    "return_softmax": False,
    "rng_state": None,
    "block_table": None,
    "zero_tensors": False,
}


def call_by_name(fn, **values):
    """Call a flash_attn internal with arguments matched to its parameter names.

    The private varlen forward/backward changed positional signatures across releases
    (``window_size`` tuple -> ``window_size_left/right``, ``softcap`` added, argument order in
    FA3); matching by name keeps every version working. Parameters we have no value for must
    have defaults, else this raises instead of guessing.
    """
    try:
        params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    except (TypeError, ValueError):  # opaque callable: trust the 2.6+ names
        return fn(
            **values,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
        )
    args = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in values:
            args[name] = values[name]
        elif p.default is p.empty:
            if name not in _FLASH_FILL:
                raise TypeError(
                    f"flash_attn {getattr(fn, '__name__', fn)} has a required "
                    f"parameter {name!r} this module does not know how to fill"
                )
            args[name] = _FLASH_FILL[name]
    return fn(**args)


def _window_values(causal, window) -> dict:
    if not window:
        return {}
    left, right = _window_sizes(causal, window)
    return {"window_size": (left, right), "window_size_left": left, "window_size_right": right}


def pkg_forward(q, k, v, cu_q, cu_k, causal, scale, window=None):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    res = call_by_name(
        _flash_attn_varlen_forward,
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=device_cu(cu_q, q.device),
        cu_seqlens_k=device_cu(cu_k, q.device),
        max_seqlen_q=max_len(cu_q),
        max_seqlen_k=max_len(cu_k),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        **_window_values(causal, window),
    )
    # 2.6+/FA3: (out, softmax_lse, ...); <= 2.5: (out, q, k, v, out_padded, softmax_lse, ...)
    want = (q.shape[1], q.shape[0])
    lse = next(
        (t for t in res[1:] if torch.is_tensor(t) and t.dtype == torch.float32 and tuple(t.shape) == want),
        None,
    )
    if lse is None:
        raise RuntimeError(
            f"flash_attn varlen forward returned no [H, Tq]={want} float32 LSE; "
            "flash_attn >= 2.4 (unpadded softmax_lse) is needed"
        )
    return res[0], _lse_from_flash(lse)


def pkg_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window=None):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    call_by_name(
        _flash_attn_varlen_backward,
        dout=dout,
        q=q,
        k=k,
        v=v,
        out=out,
        softmax_lse=_lse_to_flash(lse),
        dq=dq,
        dk=dk,
        dv=dv,
        cu_seqlens_q=device_cu(cu_q, q.device),
        cu_seqlens_k=device_cu(cu_k, q.device),
        max_seqlen_q=max_len(cu_q),
        max_seqlen_k=max_len(cu_k),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        **_window_values(causal, window),
    )
    return dq, dk, dv
